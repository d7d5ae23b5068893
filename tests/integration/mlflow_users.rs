//! The users API module (`mlflow::users`) against real MLflow servers: a private basic-auth one
//! for the lifecycle of a per-endpoint user (create, grant, write traces, re-grant, new password,
//! delete) and the shared one without auth for the probe's fallback answer.

use crate::support;

use mlflow_gateway_operator::mlflow::{
    Account, Auth, MlflowClient, MlflowConfig, MlflowError, Permission,
};
use serde_json::json;
use url::Url;

/// No retries and a long timeout: a retried create or delete would read as "already there" /
/// "already gone" when a slow first attempt did land, and these tests check each answer.
fn client(uri: &str, auth: Auth) -> MlflowClient {
    let config = MlflowConfig::builder(Url::parse(uri).expect("server URI"))
        .auth(auth)
        .request_timeout(std::time::Duration::from_secs(120))
        .max_retries(0)
        .build()
        .expect("config");
    MlflowClient::new(&config).expect("client")
}

fn basic(username: &str, password: &str) -> Auth {
    Auth::Basic {
        username: username.into(),
        password: password.into(),
    }
}

/// StartTraceV3 of one empty trace into `experiment_id`, as `username`: the HTTP status.
pub async fn start_trace(uri: &str, username: &str, password: &str, experiment_id: &str) -> u16 {
    let s = support::suffix;
    let trace_id = format!("tr-{}{}{}{}", s(), s(), s(), s());
    let body = json!({"trace": {"trace_info": {
        "trace_id": trace_id,
        "trace_location": {"type": "MLFLOW_EXPERIMENT",
                           "mlflow_experiment": {"experiment_id": experiment_id}},
        "request_time": "2026-11-30T00:00:00Z",
        "execution_duration": "0.001s",
        "state": "OK",
        "trace_metadata": {}, "tags": {}
    }}});
    reqwest::Client::new()
        .post(format!("{uri}/api/3.0/mlflow/traces"))
        .basic_auth(username, Some(password))
        .json(&body)
        .send()
        .await
        .expect("StartTraceV3")
        .status()
        .as_u16()
}

#[tokio::test]
async fn a_per_endpoint_user_lives_its_whole_life_through_the_users_api() {
    let ml = support::Mlflow::start(true);
    let (admin, admin_password) = ml.admin.clone().expect("admin credentials");
    let op = client(&ml.uri, basic(&admin, &admin_password));

    // The probe: the admin may manage users.
    assert_eq!(
        op.current_account().await.unwrap(),
        Account::Admin {
            username: admin.clone()
        }
    );

    let a = op
        .create_experiment("gateway/team-a/chat", &[])
        .await
        .unwrap();
    let b = op
        .create_experiment("gateway/team-b/chat", &[])
        .await
        .unwrap();
    let user = "gateway-endpoint/team-a/chat";
    let password = "first-password-0123456789";

    assert!(!op.user_exists(user).await.unwrap());
    assert!(op.create_user(user, password).await.unwrap(), "created");
    assert!(
        !op.create_user(user, "another-password-0123").await.unwrap(),
        "a second create finds it, and leaves its password"
    );
    assert!(op.user_exists(user).await.unwrap());

    // A user that is not an admin: the probe says so (the operator falls back to the mirror).
    let as_user = client(&ml.uri, basic(user, password));
    assert_eq!(
        as_user.current_account().await.unwrap(),
        Account::NotAdmin {
            username: user.into()
        }
    );

    // EDIT on its experiment only: traces in A, 403 in B.
    assert!(
        op.grant_experiment(user, &a, Permission::Edit)
            .await
            .unwrap()
    );
    assert!(
        !op.grant_experiment(user, &a, Permission::Edit)
            .await
            .unwrap(),
        "granted already"
    );
    let grants = op.user_grants(user).await.unwrap();
    let on: Vec<(&str, &str)> = grants
        .iter()
        .filter_map(|g| Some((g.experiment()?, g.permission.as_str())))
        .collect();
    assert_eq!(on, [(a.as_str(), "EDIT")]);
    assert_eq!(start_trace(&ml.uri, user, password, &a).await, 200);
    assert_eq!(start_trace(&ml.uri, user, password, &b).await, 403);

    // Re-granted to B: A is closed, B open.
    assert!(op.revoke_experiment(user, &a).await.unwrap());
    assert!(
        !op.revoke_experiment(user, &a).await.unwrap(),
        "revoked already"
    );
    assert!(
        op.grant_experiment(user, &b, Permission::Edit)
            .await
            .unwrap()
    );
    assert_eq!(start_trace(&ml.uri, user, password, &a).await, 403);
    assert_eq!(start_trace(&ml.uri, user, password, &b).await, 200);

    // A new password: the old one stops working at once.
    let rotated = "second-password-0123456789";
    op.update_password(user, rotated).await.unwrap();
    assert_eq!(start_trace(&ml.uri, user, password, &b).await, 401);
    assert_eq!(start_trace(&ml.uri, user, rotated, &b).await, 200);

    // Only an admin manages users: the user itself gets 403.
    let as_user = client(&ml.uri, basic(user, rotated));
    let e = as_user.delete_user(user).await.unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");

    // Deleted: its credential is refused, and a second delete finds none.
    assert!(op.delete_user(user).await.unwrap());
    assert!(!op.delete_user(user).await.unwrap());
    assert!(!op.user_exists(user).await.unwrap());
    assert_eq!(start_trace(&ml.uri, user, rotated, &b).await, 401);
    // Errors never carry a password.
    let e = client(&ml.uri, basic(user, rotated))
        .current_account()
        .await
        .unwrap_err();
    assert!(matches!(e, MlflowError::Unauthenticated { .. }), "{e:?}");
    assert!(!e.to_string().contains(rotated));
}

#[tokio::test]
async fn a_server_without_the_auth_app_has_no_users_api() {
    let ml = support::mlflow();
    let c = client(&ml.uri, Auth::None);
    assert_eq!(c.current_account().await.unwrap(), Account::NoUsersApi);
}
