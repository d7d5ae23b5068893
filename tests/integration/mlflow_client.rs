//! The MLflow client against a real tracking server (`mlflow server`, sqlite backend).

use crate::support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mlflow_gateway_operator::mlflow::{
    Auth, CallObserver, ErrorCode, LifecycleStage, MlflowClient, MlflowConfig, MlflowConfigBuilder,
    MlflowError, ViewType,
};
use url::Url;

fn config(uri: &str) -> MlflowConfigBuilder {
    MlflowConfig::builder(Url::parse(uri).expect("server URI"))
}

fn client(uri: &str) -> MlflowClient {
    MlflowClient::new(&config(uri).build().expect("config")).expect("client")
}

fn tags(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn api_code(e: &MlflowError) -> (u16, ErrorCode) {
    match e {
        MlflowError::Api { status, code, .. } => (*status, code.clone()),
        other => panic!("expected an MLflow API error, got {other:?}"),
    }
}

#[derive(Default)]
struct Recorder(Mutex<Vec<(&'static str, String)>>);

impl CallObserver for Recorder {
    fn observe(&self, call: &'static str, status: &str, _seconds: f64) {
        self.0.lock().unwrap().push((call, status.to_string()));
    }
}

#[tokio::test]
async fn create_get_and_get_by_name_show_tags() {
    let ml = support::mlflow();
    let c = client(&ml.uri);
    let name = format!("mgo-create-{}", support::suffix());

    let id = c
        .create_experiment(
            &name,
            &tags(&[
                ("mlflow.experiment.isGateway", "true"),
                ("owner", "ns/ep"),
                ("empty", ""),
            ]),
        )
        .await
        .unwrap();
    assert!(!id.is_empty());

    let by_id = c.get_experiment(&id).await.unwrap();
    assert_eq!(by_id.experiment_id, id);
    assert_eq!(by_id.name, name);
    assert_eq!(by_id.lifecycle_stage, LifecycleStage::Active);
    assert!(by_id.is_active());
    assert_eq!(by_id.tag("mlflow.experiment.isGateway"), Some("true"));
    assert_eq!(by_id.tag("owner"), Some("ns/ep"));
    assert_eq!(by_id.tag("empty"), Some(""));
    assert!(by_id.artifact_location.is_some());
    assert!(by_id.creation_time.is_some() && by_id.last_update_time.is_some());

    let by_name = c.get_experiment_by_name(&name).await.unwrap();
    assert_eq!(by_name, by_id);

    // Without tags, MLflow omits the field: an empty map.
    let bare = format!("mgo-bare-{}", support::suffix());
    let bare_id = c.create_experiment(&bare, &[]).await.unwrap();
    assert!(c.get_experiment(&bare_id).await.unwrap().tags.is_empty());

    // Names are sent URL-encoded.
    let odd = format!("mgo odd/name ?&=#% ü {}", support::suffix());
    let odd_id = c.create_experiment(&odd, &[]).await.unwrap();
    assert_eq!(
        c.get_experiment_by_name(&odd).await.unwrap().experiment_id,
        odd_id
    );
}

#[tokio::test]
async fn taken_names_and_missing_experiments() {
    let ml = support::mlflow();
    let c = client(&ml.uri);
    let name = format!("mgo-taken-{}", support::suffix());
    c.create_experiment(&name, &[]).await.unwrap();

    let e = c.create_experiment(&name, &[]).await.unwrap_err();
    assert!(e.is_already_exists(), "{e:?}");
    assert_eq!(api_code(&e), (400, ErrorCode::ResourceAlreadyExists));
    assert!(!e.is_transient());
    assert_eq!(e.label(), "already_exists");
    assert_eq!(e.call(), "experiments/create");

    let e = c.get_experiment("987654321").await.unwrap_err();
    assert!(e.is_not_found(), "{e:?}");
    assert_eq!(api_code(&e), (404, ErrorCode::ResourceDoesNotExist));
    assert_eq!(e.label(), "not_found");

    let e = c
        .get_experiment_by_name(&format!("mgo-missing-{}", support::suffix()))
        .await
        .unwrap_err();
    assert!(e.is_not_found(), "{e:?}");

    // A malformed id is a parameter error, not "not found".
    let e = c.get_experiment("not-a-number").await.unwrap_err();
    assert_eq!(api_code(&e), (400, ErrorCode::InvalidParameterValue));
}

#[tokio::test]
async fn rename_and_rename_onto_a_taken_name() {
    let ml = support::mlflow();
    let c = client(&ml.uri);
    let s = support::suffix();
    let a = c
        .create_experiment(&format!("mgo-rename-a-{s}"), &[])
        .await
        .unwrap();
    c.create_experiment(&format!("mgo-rename-b-{s}"), &[])
        .await
        .unwrap();

    c.rename_experiment(&a, &format!("mgo-rename-c-{s}"))
        .await
        .unwrap();
    assert_eq!(
        c.get_experiment(&a).await.unwrap().name,
        format!("mgo-rename-c-{s}")
    );
    let old = c
        .get_experiment_by_name(&format!("mgo-rename-a-{s}"))
        .await
        .unwrap_err();
    assert!(old.is_not_found(), "{old:?}");

    let e = c
        .rename_experiment(&a, &format!("mgo-rename-b-{s}"))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), (400, ErrorCode::BadRequest));
    assert!(!e.is_already_exists() && !e.is_transient());
    assert_eq!(e.call(), "experiments/update");
    assert_eq!(
        c.get_experiment(&a).await.unwrap().name,
        format!("mgo-rename-c-{s}")
    );
}

#[tokio::test]
async fn delete_set_tag_and_restore() {
    let ml = support::mlflow();
    let recorder = Arc::new(Recorder::default());
    let c = client(&ml.uri).with_observer(recorder.clone());
    let name = format!("mgo-delete-{}", support::suffix());
    let id = c
        .create_experiment(&name, &tags(&[("k", "v")]))
        .await
        .unwrap();

    c.delete_experiment(&id).await.unwrap();
    let deleted = c.get_experiment(&id).await.unwrap();
    assert_eq!(deleted.lifecycle_stage, LifecycleStage::Deleted);
    assert!(!deleted.is_active());
    assert_eq!(deleted.tag("k"), Some("v"));
    // A deleted experiment keeps its name: found by name, and the name stays taken.
    assert_eq!(
        c.get_experiment_by_name(&name).await.unwrap().experiment_id,
        id
    );
    assert!(
        c.create_experiment(&name, &[])
            .await
            .unwrap_err()
            .is_already_exists()
    );

    let e = c.set_experiment_tag(&id, "k", "w").await.unwrap_err();
    assert_eq!(api_code(&e), (400, ErrorCode::InvalidParameterValue));
    assert!(e.to_string().contains("active"), "{e}");
    assert!(!e.is_transient());

    // Renaming a deleted experiment is INVALID_STATE with HTTP 500: not retried.
    let before = recorder.0.lock().unwrap().len();
    let e = c
        .rename_experiment(&id, &format!("{name}-renamed"))
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), (500, ErrorCode::InvalidState));
    assert!(!e.is_transient());
    assert_eq!(
        recorder.0.lock().unwrap()[before..],
        [("experiments/update", "500".to_string())]
    );

    // Deleting twice: the server no longer finds an active experiment.
    assert!(c.delete_experiment(&id).await.unwrap_err().is_not_found());

    c.restore_experiment(&id).await.unwrap();
    let restored = c.get_experiment(&id).await.unwrap();
    assert!(restored.is_active());
    c.set_experiment_tag(&id, "k", "w").await.unwrap();
    assert_eq!(c.get_experiment(&id).await.unwrap().tag("k"), Some("w"));

    // Restoring an active experiment: not found (among deleted ones).
    assert!(c.restore_experiment(&id).await.unwrap_err().is_not_found());
}

#[tokio::test]
async fn search_by_tag_view_types_and_pagination() {
    let ml = support::mlflow();
    let c = client(&ml.uri);
    let s = support::suffix();
    let key = format!("mgo.test.{s}");
    let filter = format!("tags.`{key}` = 'yes'");

    let mut ids = Vec::new();
    for i in 0..4 {
        let id = c
            .create_experiment(&format!("mgo-search-{s}-{i}"), &tags(&[(&key, "yes")]))
            .await
            .unwrap();
        ids.push(id);
    }
    c.create_experiment(&format!("mgo-search-{s}-other"), &tags(&[(&key, "no")]))
        .await
        .unwrap();
    c.create_experiment(&format!("mgo-search-{s}-untagged"), &[])
        .await
        .unwrap();

    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    let found = c
        .search_all_experiments(&filter, ViewType::ActiveOnly)
        .await
        .unwrap();
    assert_eq!(
        sorted(found.iter().map(|e| e.experiment_id.clone()).collect()),
        sorted(ids.clone())
    );
    assert!(found.iter().all(|e| e.tag(&key) == Some("yes")));

    // Page by page, one at a time.
    let mut token: Option<String> = None;
    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        let page = c
            .search_experiments(&filter, ViewType::ActiveOnly, 1, token.as_deref())
            .await
            .unwrap();
        assert!(page.experiments.len() <= 1);
        paged.extend(page.experiments.into_iter().map(|e| e.experiment_id));
        pages += 1;
        assert!(pages <= 10, "pagination does not end");
        match page.next_page_token {
            Some(t) => token = Some(t),
            None => break,
        }
    }
    assert_eq!(sorted(paged), sorted(ids.clone()));
    assert!(pages >= 4);

    let all_paged = c
        .search_all_experiments_paged(&filter, ViewType::ActiveOnly, 1)
        .await
        .unwrap();
    assert_eq!(
        sorted(all_paged.iter().map(|e| e.experiment_id.clone()).collect()),
        sorted(ids.clone())
    );

    // View types.
    c.delete_experiment(&ids[0]).await.unwrap();
    let active = c
        .search_all_experiments(&filter, ViewType::ActiveOnly)
        .await
        .unwrap();
    assert_eq!(active.len(), 3);
    assert!(active.iter().all(|e| e.experiment_id != ids[0]));
    let deleted = c
        .search_all_experiments(&filter, ViewType::DeletedOnly)
        .await
        .unwrap();
    assert_eq!(
        deleted
            .iter()
            .map(|e| e.experiment_id.as_str())
            .collect::<Vec<_>>(),
        [ids[0].as_str()]
    );
    assert_eq!(deleted[0].lifecycle_stage, LifecycleStage::Deleted);
    let all = c
        .search_all_experiments(&filter, ViewType::All)
        .await
        .unwrap();
    assert_eq!(all.len(), 4);

    // Nothing matches: an empty answer, not an error.
    let none = c
        .search_experiments(&format!("tags.`{key}` = 'never'"), ViewType::All, 10, None)
        .await
        .unwrap();
    assert!(none.experiments.is_empty() && none.next_page_token.is_none());

    // A bad filter is a parameter error.
    let e = c
        .search_experiments("bogus =", ViewType::All, 10, None)
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), (400, ErrorCode::InvalidParameterValue));
}

#[tokio::test]
async fn write_count_counts_only_mutating_calls() {
    let ml = support::mlflow();
    let c = client(&ml.uri);
    let clone = c.clone();
    let name = format!("mgo-writes-{}", support::suffix());
    assert_eq!(c.write_count(), 0);

    let id = c.create_experiment(&name, &[]).await.unwrap();
    assert_eq!(c.write_count(), 1);

    // Reads write nothing.
    c.get_experiment(&id).await.unwrap();
    c.get_experiment_by_name(&name).await.unwrap();
    c.search_experiments("", ViewType::All, 5, None)
        .await
        .unwrap();
    c.search_all_experiments(&format!("name = '{name}'"), ViewType::All)
        .await
        .unwrap();
    assert!(c.get_experiment("987654321").await.is_err());
    assert_eq!(c.write_count(), 1);

    // Every mutating request counts, failed ones too; clones share the counter.
    clone.set_experiment_tag(&id, "k", "v").await.unwrap();
    clone
        .rename_experiment(&id, &format!("{name}-2"))
        .await
        .unwrap();
    clone.delete_experiment(&id).await.unwrap();
    clone.restore_experiment(&id).await.unwrap();
    assert!(
        clone
            .create_experiment(&format!("{name}-2"), &[])
            .await
            .is_err()
    );
    assert_eq!(c.write_count(), 6);
    assert_eq!(clone.write_count(), 6);

    // A client of its own counts from zero.
    assert_eq!(client(&ml.uri).write_count(), 0);
}

#[tokio::test]
async fn observer_sees_each_request_with_its_status() {
    let ml = support::mlflow();
    let recorder = Arc::new(Recorder::default());
    let c = client(&ml.uri).with_observer(recorder.clone());
    let name = format!("mgo-observe-{}", support::suffix());
    let id = c.create_experiment(&name, &[]).await.unwrap();
    c.get_experiment(&id).await.unwrap();
    let _ = c.get_experiment("987654321").await;
    let _ = c.create_experiment(&name, &[]).await;
    assert_eq!(
        recorder.0.lock().unwrap().clone(),
        [
            ("experiments/create", "200".to_string()),
            ("experiments/get", "200".to_string()),
            ("experiments/get", "404".to_string()),
            ("experiments/create", "400".to_string()),
        ]
    );
}

/// One private basic-auth server: credentials, permissions, then an outage and recovery.
#[tokio::test]
async fn basic_auth_server_credentials_outage_and_recovery() {
    let private = support::Mlflow::start(true);
    let (admin, password) = private.admin.clone().expect("admin credentials");

    let with_auth = |auth: Auth| {
        let c = config(&private.uri).auth(auth).build().expect("config");
        MlflowClient::new(&c).expect("client")
    };

    // No credentials, a wrong password, a bearer token: 401.
    let name = format!("mgo-auth-{}", support::suffix());
    for (what, auth) in [
        ("no credentials", Auth::None),
        (
            "wrong password",
            Auth::Basic {
                username: admin.clone(),
                password: "definitely-wrong-password".into(),
            },
        ),
        (
            "bearer token",
            Auth::Bearer {
                token: password.clone(),
            },
        ),
    ] {
        let e = with_auth(auth)
            .create_experiment(&name, &[])
            .await
            .unwrap_err();
        assert!(
            matches!(
                e,
                MlflowError::Unauthenticated {
                    call: "experiments/create"
                }
            ),
            "{what}: {e:?}"
        );
        assert!(!e.is_transient(), "{what}");
        assert_eq!(e.label(), "unauthenticated");
        assert!(!e.to_string().contains(&password), "{what}: {e}");
        assert!(!format!("{e:?}").contains(&password), "{what}: {e:?}");
    }

    let admin_client = with_auth(Auth::Basic {
        username: admin.clone(),
        password: password.clone(),
    });
    let id = support::new_experiment(&admin_client, &name).await;
    assert_eq!(admin_client.get_experiment(&id).await.unwrap().name, name);

    // A user without permission on the admin's experiment: 403 (a plain-text body).
    let user = format!("mgo-user-{}", support::suffix());
    let user_password = format!("pw-{}-{}", support::suffix(), support::suffix());
    let created = private
        .request(reqwest::Method::POST, "/api/2.0/mlflow/users/create")
        .json(&serde_json::json!({"username": user, "password": user_password}))
        .send()
        .await
        .unwrap();
    assert!(created.status().is_success(), "{:?}", created.text().await);
    let user_client = with_auth(Auth::Basic {
        username: user.clone(),
        password: user_password.clone(),
    });
    assert_eq!(user_client.get_experiment(&id).await.unwrap().name, name);
    let e = user_client
        .set_experiment_tag(&id, "k", "v")
        .await
        .unwrap_err();
    assert_eq!(api_code(&e), (403, ErrorCode::PermissionDenied));
    assert_eq!(e.label(), "permission_denied");
    assert!(!e.is_transient());

    // Outage: quick failures with a short timeout and no retries.
    let quick = config(&private.uri)
        .auth(Auth::Basic {
            username: admin.clone(),
            password: password.clone(),
        })
        .max_retries(0)
        .request_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let quick = MlflowClient::new(&quick).unwrap();
    private.stop();
    let started = std::time::Instant::now();
    let e = quick.get_experiment(&id).await.unwrap_err();
    assert!(matches!(e, MlflowError::Unavailable { .. }), "{e:?}");
    assert!(e.is_transient());
    assert_eq!(e.label(), "unavailable");
    assert_eq!(e.call(), "experiments/get");
    assert!(!e.to_string().contains(&password), "{e}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let e = quick.create_experiment("mgo-never", &[]).await.unwrap_err();
    assert!(e.is_transient(), "{e:?}");

    // The default client retries with backoff, then gives up: still Unavailable.
    let started = std::time::Instant::now();
    let e = admin_client.get_experiment(&id).await.unwrap_err();
    assert!(matches!(e, MlflowError::Unavailable { .. }), "{e:?}");
    // 3 retries: 200 + 400 + 800 ms of backoff.
    assert!(started.elapsed() >= Duration::from_millis(1400));

    private.resume();
    // The same client works again once the server answers (its first answers after a start can
    // be slower than the short timeout, so poll).
    let back = support::eventually(60, "the client to work after resume", || async {
        quick.get_experiment(&id).await.ok()
    })
    .await;
    assert_eq!(back.name, name);
    assert!(back.is_active());
    admin_client
        .set_experiment_tag(&id, "after", "outage")
        .await
        .unwrap();
    assert_eq!(
        admin_client.get_experiment(&id).await.unwrap().tag("after"),
        Some("outage")
    );
}
