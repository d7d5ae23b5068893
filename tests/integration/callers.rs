//! Who may call a gateway (`spec.access`): API keys from files (good, unknown, rotated and revoked
//! without a restart), ServiceAccount tokens issued by the real API server (TokenRequest: valid,
//! wrong audience, foreign namespace, revoked with its bound object) reviewed by a gateway that
//! holds nothing but `create tokenreviews`, refusals in OpenAI's shape counted by reason, and the
//! caller's identity read back from the trace in MLflow. Then the operator's wiring: the
//! endpoint's ServiceAccount and grant, the mounted keys, and the grant gone with the endpoint.

use crate::support;

use std::path::{Path, PathBuf};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::{Value, json};
use support::fake_llm::FakeLlm;
use support::{GatewayProcess, Mlflow, cluster};

const PROVIDER_KEY: &str = "sk-provider-key-callers-0123";

fn manifest(fake: &FakeLlm, access: &str, tracking: bool) -> String {
    format!(
        "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: chat, namespace: team-a, uid: callers-uid}}\nspec:\n  models:\n    - {{name: main, provider: openai, model: m, apiBase: \"{}/v1\", apiKeySecretRef: {{name: keys, key: k}}}}\n  usageTracking: {tracking}\n{access}",
        fake.url
    )
}

async fn experiment(ml: &Mlflow) -> String {
    use mlflow_gateway_operator::mlflow::{MlflowClient, MlflowConfig};
    let client = MlflowClient::new(&MlflowConfig::new(ml.uri.parse().unwrap()).unwrap()).unwrap();
    support::new_experiment(&client, &format!("callers-{}", support::suffix())).await
}

async fn call(url: &str, bearer: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v1/chat/completions"))
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    req.send().await.unwrap()
}

async fn status(url: &str, bearer: Option<&str>) -> u16 {
    call(url, bearer).await.status().as_u16()
}

/// A refusal: its status, and its body in OpenAI's shape (checked here).
async fn refusal(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    if status == 401 {
        assert!(resp.headers().contains_key("www-authenticate"));
    }
    let body: Value = resp.json().await.unwrap();
    let err = &body["error"];
    assert!(err["message"].is_string(), "{body}");
    assert_eq!(err["type"], "invalid_request_error", "{body}");
    assert!(err.get("param").is_some(), "{body}");
    let code = if status == 401 {
        "invalid_api_key"
    } else {
        "permission_denied"
    };
    assert_eq!(err["code"], code, "{body}");
    (status, body)
}

/// The trace's metadata in MLflow, once the trace info is stored.
async fn trace_metadata(ml: &Mlflow, resp: &reqwest::Response) -> Value {
    let trace_id = resp.headers()["x-mlflow-trace-id"]
        .to_str()
        .unwrap()
        .to_string();
    let client = reqwest::Client::new();
    support::eventually(30, &format!("trace {trace_id} in MLflow"), || async {
        let v: Value = client
            .get(format!("{}/api/3.0/mlflow/traces/get", ml.uri))
            .query(&[("trace_id", trace_id.as_str())])
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        let meta = v.pointer("/trace/trace_info/trace_metadata")?;
        meta.get("mlflow.gateway.requestType")?;
        Some(meta.clone())
    })
    .await
}

fn write_key(dir: &Path, name: &str, text: &str) {
    std::fs::create_dir_all(dir.join(name)).unwrap();
    // As the kubelet does: the new content appears at once (rename), never half-written.
    let tmp = dir.join(name).join(".key.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(name).join("key")).unwrap();
}

fn keys_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mgo-caller-keys-{}", support::suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn an_endpoint_without_access_refuses_every_call_and_open_admits_all() {
    let fake = FakeLlm::start("openai", PROVIDER_KEY).await;
    let env = [("GATEWAY_API_KEY_MAIN", PROVIDER_KEY)];
    let closed = GatewayProcess::start(&manifest(&fake, "", false), &env).await;
    let (code, body) = refusal(call(&closed.url, Some("anything")).await).await;
    assert_eq!(code, 403);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.access"),
        "{body}"
    );
    // Probes and metrics stay reachable.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let r = reqwest::get(format!("{}{path}", closed.url)).await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    assert_eq!(
        closed
            .metric(
                "mlflow_gateway_access_refused_total",
                &[r#"reason="not_declared""#, r#"status="403""#]
            )
            .await,
        1.0
    );
    assert_eq!(
        fake.request_count(),
        0,
        "a refused call reached the provider"
    );

    let open =
        GatewayProcess::start(&manifest(&fake, "  access: {open: true}\n", false), &env).await;
    assert_eq!(status(&open.url, None).await, 200);

    // What each kind of caller needs is there at start, or the gateway says what is missing.
    let keys = "  access:\n    apiKeys: [{name: ci, secretRef: {name: s, key: k}}]\n";
    let (_, err) = GatewayProcess::refuse(&manifest(&fake, keys, false), &env);
    assert!(err.contains("GATEWAY_CALLER_KEYS_DIR"), "{err}");
    let accounts = "  access:\n    serviceAccounts: {namespaces: [x]}\n";
    let (_, err) = GatewayProcess::refuse(&manifest(&fake, accounts, false), &env);
    assert!(err.contains("spec.access.serviceAccounts"), "{err}");
}

#[tokio::test]
async fn api_keys_admit_their_caller_by_name_and_rotate_and_revoke_without_a_restart() {
    let ml = support::mlflow();
    let exp = experiment(ml).await;
    let fake = FakeLlm::start("openai", PROVIDER_KEY).await;
    let dir = keys_dir();
    write_key(&dir, "ci", "sk-ci-old-1111\n");
    let access = "  access:\n    apiKeys:\n      - {name: ci, secretRef: {name: callers, key: ci}}\n      - {name: batch, secretRef: {name: callers, key: batch}}\n";
    let gw = GatewayProcess::start(
        &manifest(&fake, access, true),
        &[
            ("GATEWAY_API_KEY_MAIN", PROVIDER_KEY),
            ("MLFLOW_TRACKING_URI", &ml.uri),
            ("MLFLOW_EXPERIMENT_ID", &exp),
            // The gateway metadata read back as trace metadata.
            ("GATEWAY_TRACE_EXPORT_MODE", "info-then-spans"),
            ("GATEWAY_CALLER_KEYS_DIR", dir.to_str().unwrap()),
            ("GATEWAY_CALLER_KEYS_RELOAD_SECONDS", "1"),
        ],
    )
    .await;

    // No credential, a malformed one, an unknown key: 401 in OpenAI's shape.
    assert_eq!(refusal(call(&gw.url, None).await).await.0, 401);
    let bad = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("authorization", "Basic Y2k6c2s=")
        .json(&json!({"model": "chat", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(refusal(bad).await.0, 401);
    assert_eq!(refusal(call(&gw.url, Some("sk-nobody")).await).await.0, 401);

    // The good key: answered, and the trace names the caller as MLflow's gateway does.
    let resp = call(&gw.url, Some("sk-ci-old-1111")).await;
    assert_eq!(resp.status(), 200);
    let meta = trace_metadata(ml, &resp).await;
    assert_eq!(meta["mlflow.auth.username"], "apikey:ci", "{meta}");
    assert_eq!(meta["mlflow.trace.user"], "apikey:ci", "{meta}");
    assert!(meta.get("mlflow.auth.userId").is_none(), "{meta}");

    // Anthropic's SDKs send the key as `x-api-key`: the same key works there.
    let anthropic_style = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gw.url))
        .header("x-api-key", "sk-ci-old-1111")
        .json(&json!({"model": "chat", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(anthropic_style.status(), 200);

    // Rotation: the new key is added beside the old one, then the old one removed.
    write_key(&dir, "ci", "sk-ci-old-1111\nsk-ci-new-2222\n");
    support::eventually(15, "the new key admitted", || async {
        (status(&gw.url, Some("sk-ci-new-2222")).await == 200).then_some(())
    })
    .await;
    assert_eq!(status(&gw.url, Some("sk-ci-old-1111")).await, 200);
    write_key(&dir, "ci", "sk-ci-new-2222");
    support::eventually(15, "the old key refused", || async {
        (status(&gw.url, Some("sk-ci-old-1111")).await == 401).then_some(())
    })
    .await;
    assert_eq!(status(&gw.url, Some("sk-ci-new-2222")).await, 200);
    // A second caller's key appears (its Secret was created after the pods).
    write_key(&dir, "batch", "sk-batch-3333\n");
    support::eventually(15, "the batch key admitted", || async {
        (status(&gw.url, Some("sk-batch-3333")).await == 200).then_some(())
    })
    .await;
    // Revocation: the key's Secret is gone.
    std::fs::remove_dir_all(dir.join("ci")).unwrap();
    support::eventually(15, "the revoked key refused", || async {
        (status(&gw.url, Some("sk-ci-new-2222")).await == 401).then_some(())
    })
    .await;

    let refused = |reason: &'static str| {
        let gw = &gw;
        async move {
            gw.metric(
                "mlflow_gateway_access_refused_total",
                &[&format!("reason=\"{reason}\""), "status=\"401\""],
            )
            .await
        }
    };
    assert_eq!(refused("missing_credential").await, 1.0);
    assert_eq!(refused("malformed_credential").await, 1.0);
    assert!(refused("invalid_credential").await >= 3.0);
    assert!(
        gw.metric(
            "mlflow_gateway_caller_requests_total",
            &[r#"caller="apikey:ci""#, r#"status="200""#]
        )
        .await
            >= 4.0
    );
    assert!(
        gw.metric(
            "mlflow_gateway_caller_requests_total",
            &[r#"caller="apikey:batch""#]
        )
        .await
            >= 1.0
    );
    let log = gw.log_text();
    for secret in [
        "sk-ci-old-1111",
        "sk-ci-new-2222",
        "sk-batch-3333",
        PROVIDER_KEY,
    ] {
        assert!(!log.contains(secret), "a key in the log");
    }
    let metrics = reqwest::get(format!("{}/metrics", gw.url))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!metrics.contains("sk-"), "a key in the metrics");
    std::fs::remove_dir_all(&dir).ok();
}

// ---------------------------------------------------------------------------------------------
// ServiceAccount tokens

async fn service_account(client: &kube::Client, ns: &str, name: &str) -> ServiceAccount {
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns}})).unwrap();
    Api::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &sa)
        .await
        .unwrap()
}

/// A token of `ns/name` from the API server's TokenRequest API (10 minutes, its shortest).
async fn token(
    client: &kube::Client,
    ns: &str,
    name: &str,
    audiences: &[&str],
    bound: Option<&Secret>,
) -> String {
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expiration_seconds: Some(600),
            bound_object_ref: bound.map(|s| BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Secret".into()),
                name: Some(s.name_any()),
                uid: s.uid(),
            }),
        },
        ..Default::default()
    };
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .create_token_request(name, &PostParams::default(), &req)
        .await
        .unwrap()
        .status
        .unwrap()
        .token
}

/// A ClusterRole as the chart ships it (`create tokenreviews`, nothing else), bound to `ns/sa`.
async fn grant_token_review(client: &kube::Client, ns: &str, sa: &str) -> String {
    let role = format!("callers-tokenreview-{}", support::suffix());
    let cr: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": role},
        "rules": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
    }))
    .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &cr)
        .await
        .unwrap();
    let crb: ClusterRoleBinding = serde_json::from_value(json!({
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns}]
    }))
    .unwrap();
    Api::<ClusterRoleBinding>::all(client.clone())
        .create(&PostParams::default(), &crb)
        .await
        .unwrap();
    role
}

/// A kubeconfig that authenticates with `token` (the gateway then is that ServiceAccount).
fn kubeconfig_with_token(token: &str) -> PathBuf {
    let c = cluster();
    let path = std::env::temp_dir().join(format!("mgo-kubeconfig-{}", support::suffix()));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: \"{}\", certificate-authority: \"{}\"}}}}]\nusers: [{{name: u, user: {{token: \"{token}\"}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n",
            c.api_url,
            c.ca_file.display()
        ),
    )
    .unwrap();
    path
}

#[tokio::test]
async fn service_account_tokens_from_the_api_server_are_admitted_by_namespace_name_and_audience() {
    let ml = support::mlflow();
    let exp = experiment(ml).await;
    let fake = FakeLlm::start("openai", PROVIDER_KEY).await;
    let client = cluster().client().await;
    let home = support::namespace(&client, "callers-home").await;
    let foreign = support::namespace(&client, "callers-foreign").await;
    let agent = service_account(&client, &home, "agent").await;
    service_account(&client, &foreign, "intruder").await;
    service_account(&client, &foreign, "friend").await;
    // The gateway's own identity: allowed to create token reviews, nothing else.
    service_account(&client, &home, "gw").await;
    let role = grant_token_review(&client, &home, "gw").await;
    let gw_token = token(&client, &home, "gw", &[], None).await;
    let kubeconfig = kubeconfig_with_token(&gw_token);

    let audience = "mlflow-gateway.dev/team-a/chat";
    let access = format!(
        "  access:\n    serviceAccounts:\n      namespaces: [{home}]\n      names: [{foreign}/friend]\n"
    );
    let gw = GatewayProcess::start(
        &manifest(&fake, &access, true),
        &[
            ("GATEWAY_API_KEY_MAIN", PROVIDER_KEY),
            ("MLFLOW_TRACKING_URI", &ml.uri),
            ("MLFLOW_EXPERIMENT_ID", &exp),
            // The gateway metadata read back as trace metadata.
            ("GATEWAY_TRACE_EXPORT_MODE", "info-then-spans"),
            ("KUBECONFIG", kubeconfig.to_str().unwrap()),
            ("GATEWAY_TOKEN_CACHE_SECONDS", "1"),
        ],
    )
    .await;

    // Valid: admitted, and the trace carries the ServiceAccount's name and uid.
    let valid = token(&client, &home, "agent", &[audience], None).await;
    let resp = call(&gw.url, Some(&valid)).await;
    assert_eq!(resp.status(), 200, "{}", gw.log_text());
    let meta = trace_metadata(ml, &resp).await;
    let who = format!("system:serviceaccount:{home}:agent");
    assert_eq!(meta["mlflow.auth.username"], who.as_str(), "{meta}");
    assert_eq!(meta["mlflow.trace.user"], who.as_str(), "{meta}");
    assert_eq!(meta["mlflow.auth.userId"], agent.uid().unwrap().as_str());
    // Cached: a second call is admitted too.
    assert_eq!(status(&gw.url, Some(&valid)).await, 200);

    // Wrong audience (another service's, and the API server's own): 401.
    let other = token(&client, &home, "agent", &["vault"], None).await;
    assert_eq!(refusal(call(&gw.url, Some(&other)).await).await.0, 401);
    let api_audience = token(&client, &home, "agent", &[], None).await;
    assert_eq!(
        refusal(call(&gw.url, Some(&api_audience)).await).await.0,
        401
    );

    // Foreign namespace: authenticated, not admitted: 403 naming the account. Listed by name: 200.
    let intruder = token(&client, &foreign, "intruder", &[audience], None).await;
    let (code, body) = refusal(call(&gw.url, Some(&intruder)).await).await;
    assert_eq!(code, 403);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&format!("{foreign}/intruder")),
        "{body}"
    );
    let friend = token(&client, &foreign, "friend", &[audience], None).await;
    assert_eq!(status(&gw.url, Some(&friend)).await, 200);

    // Revoked: a token bound to a Secret dies with it (an expired token is refused alike; the
    // API server issues none shorter than 10 minutes, so expiry is a unit test of the cache).
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &home);
    let bound_to: Secret = secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "session"}})).unwrap(),
        )
        .await
        .unwrap();
    let bound = token(&client, &home, "agent", &[audience], Some(&bound_to)).await;
    assert_eq!(status(&gw.url, Some(&bound)).await, 200);
    secrets
        .delete("session", &DeleteParams::default())
        .await
        .unwrap();
    support::eventually(30, "the token of a deleted Secret refused", || async {
        (status(&gw.url, Some(&bound)).await == 401).then_some(())
    })
    .await;

    assert_eq!(
        gw.metric(
            "mlflow_gateway_access_refused_total",
            &[r#"reason="not_admitted""#, r#"status="403""#]
        )
        .await,
        1.0
    );
    assert!(
        gw.metric(
            "mlflow_gateway_caller_requests_total",
            &[&format!("caller=\"{who}\""), r#"status="200""#]
        )
        .await
            >= 2.0
    );
    let log = gw.log_text();
    for t in [&valid, &intruder, &bound, &gw_token] {
        assert!(!log.contains(t.as_str()), "a token in the log");
    }
    Api::<ClusterRoleBinding>::all(client.clone())
        .delete(&role, &DeleteParams::default())
        .await
        .ok();
    Api::<ClusterRole>::all(client.clone())
        .delete(&role, &DeleteParams::default())
        .await
        .ok();
}

// ---------------------------------------------------------------------------------------------
// The operator's wiring

fn can_i(args: &[&str]) -> String {
    let (_, out, _) = cluster().kubectl_run(&[&["auth", "can-i"], args].concat(), None);
    out.trim().to_string()
}

#[tokio::test]
async fn the_operator_gives_the_pods_their_own_account_the_token_review_grant_only_and_the_keys() {
    use k8s_openapi::api::apps::v1::Deployment;
    use mlflow_gateway_operator::api::GatewayEndpoint;

    let ml = support::mlflow();
    let client = cluster().client().await;
    let ns = support::namespace(&client, "callers-e2e").await;
    let fake = FakeLlm::start("openai", PROVIDER_KEY).await;
    support::secret(&client, &ns, "llm-keys", &[("openai", PROVIDER_KEY)]).await;
    // As `kubectl create secret --from-file` makes it: with the file's trailing newline.
    support::secret(&client, &ns, "callers", &[("ci", "sk-e2e-ci-4444\n")]).await;
    // The chart's role, not bound to anyone yet.
    let role = format!("callers-e2e-tokenreview-{}", support::suffix());
    let cr: ClusterRole = serde_json::from_value(json!({
        "metadata": {"name": role},
        "rules": [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}]
    }))
    .unwrap();
    Api::<ClusterRole>::all(client.clone())
        .create(&PostParams::default(), &cr)
        .await
        .unwrap();
    let _op = support::Operator::start(
        &ns,
        &ml.uri,
        &[
            ("RESYNC_PERIOD_SECONDS", "3"),
            ("MAX_BACKOFF_SECONDS", "4"),
            ("GATEWAY_TOKEN_REVIEW_CLUSTER_ROLE", &role),
        ],
    );
    let yaml = |policy: &str| {
        format!(
            "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: chat}}\nspec:\n  models:\n    - {{name: main, provider: openai, model: m, apiBase: \"{}/v1\", apiKeySecretRef: {{name: llm-keys, key: openai}}}}\n  access:\n    serviceAccounts: {{namespaces: [{ns}]}}\n    apiKeys: [{{name: ci, secretRef: {{name: callers, key: ci}}}}]\n{policy}",
            fake.url
        )
    };
    support::apply(
        &ns,
        &yaml(
            "    networkPolicy: {from: [{namespaceSelector: {matchLabels: {ingress: \"true\"}}}]}\n",
        ),
    );
    let endpoints: Api<GatewayEndpoint> = Api::namespaced(client.clone(), &ns);
    support::wait_condition(&endpoints, "chat", "Ready", "True", None, 90).await;

    // The pods run as the endpoint's account, with its token, and the keys' Secret mounted.
    let d = Api::<Deployment>::namespaced(client.clone(), &ns)
        .get("chat")
        .await
        .unwrap();
    let pod = d.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("chat-gateway"));
    assert_eq!(pod.automount_service_account_token, Some(true));
    let vol = pod
        .volumes
        .unwrap()
        .into_iter()
        .find_map(|v| v.secret)
        .expect("the keys' Secret volume");
    assert_eq!(vol.secret_name.as_deref(), Some("callers"));
    assert_eq!(vol.optional, Some(true));

    // Exactly the permission the check needs, for that account only.
    let sa = format!("system:serviceaccount:{ns}:chat-gateway");
    let binding = format!("mlflow-gateway-tokenreview:{ns}:chat");
    let bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    support::eventually(30, "the token-review binding", || async {
        bindings.get_opt(&binding).await.ok().flatten()
    })
    .await;
    assert_eq!(
        can_i(&["create", "tokenreviews.authentication.k8s.io", "--as", &sa]),
        "yes"
    );
    for denied in [
        vec!["get", "secrets", "-n", &ns, "--as", &sa],
        vec!["list", "pods", "-n", &ns, "--as", &sa],
        vec![
            "create",
            "subjectaccessreviews.authorization.k8s.io",
            "--as",
            &sa,
        ],
    ] {
        assert_eq!(can_i(&denied), "no", "{denied:?}");
    }
    let default_sa = format!("system:serviceaccount:{ns}:default");
    assert_eq!(
        can_i(&[
            "create",
            "tokenreviews.authentication.k8s.io",
            "--as",
            &default_sa
        ]),
        "no"
    );

    // The gateway as the Deployment declares it (the keys' Secret volume included), authenticated
    // as its ServiceAccount.
    let gw_token = token(&client, &ns, "chat-gateway", &[], None).await;
    let kubeconfig = kubeconfig_with_token(&gw_token);
    let gw = support::gateway_from_deployment(
        &client,
        &ns,
        "chat",
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
    .await;
    service_account(&client, &ns, "agent").await;
    let agent = token(
        &client,
        &ns,
        "agent",
        &[&format!("mlflow-gateway.dev/{ns}/chat")],
        None,
    )
    .await;
    assert_eq!(
        status(&gw.url, Some(&agent)).await,
        200,
        "{}",
        gw.log_text()
    );
    assert_eq!(status(&gw.url, Some("sk-e2e-ci-4444")).await, 200);
    assert_eq!(status(&gw.url, None).await, 401);

    // The NetworkPolicy from the same declaration: the callers' namespace and the given peer, on
    // the gateway port; gone when no longer declared.
    let policies: Api<NetworkPolicy> = Api::namespaced(client.clone(), &ns);
    let policy = policies.get("chat").await.unwrap().spec.unwrap();
    let rule = &policy.ingress.unwrap()[0];
    let from = rule.from.as_ref().unwrap();
    assert_eq!(
        from[0]
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_expressions
            .as_ref()
            .unwrap()[0]
            .values,
        Some(vec![ns.clone()])
    );
    assert_eq!(from.len(), 2);
    assert_eq!(
        policy.pod_selector.unwrap().match_labels.unwrap()["app.kubernetes.io/instance"],
        "chat"
    );
    support::apply(&ns, &yaml(""));
    support::eventually(60, "the NetworkPolicy deleted", || async {
        policies
            .get_opt("chat")
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await;

    // The grant goes with the endpoint (a cluster-scoped object has no owner to follow).
    endpoints
        .delete("chat", &DeleteParams::default())
        .await
        .unwrap();
    support::eventually(60, "the token-review binding deleted", || async {
        bindings
            .get_opt(&binding)
            .await
            .ok()
            .and_then(|b| b.is_none().then_some(()))
    })
    .await;
    Api::<ClusterRole>::all(client.clone())
        .delete(&role, &DeleteParams::default())
        .await
        .ok();
}

#[tokio::test]
async fn serviceaccount_callers_on_an_install_without_token_review_are_refused_with_a_condition() {
    use mlflow_gateway_operator::api::GatewayEndpoint;

    let ml = support::mlflow();
    let client = cluster().client().await;
    let ns = support::namespace(&client, "callers-noreview").await;
    support::secret(&client, &ns, "llm-keys", &[("openai", PROVIDER_KEY)]).await;
    let _op = support::Operator::start(
        &ns,
        &ml.uri,
        &[("RESYNC_PERIOD_SECONDS", "3"), ("MAX_BACKOFF_SECONDS", "4")],
    );
    let yaml = |access: &str| {
        format!(
            "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: chat}}\nspec:\n  models:\n    - {{name: main, provider: openai, model: m, apiKeySecretRef: {{name: llm-keys, key: openai}}}}\n  access:\n{access}"
        )
    };
    support::apply(&ns, &yaml("    serviceAccounts: {namespaces: [agents]}\n"));
    let endpoints: Api<GatewayEndpoint> = Api::namespaced(client.clone(), &ns);
    let ep = support::wait_condition(
        &endpoints,
        "chat",
        "Ready",
        "False",
        Some("AccessNotSupported"),
        60,
    )
    .await;
    let status = ep.status.unwrap();
    let message = &status.condition("Ready").unwrap().message;
    assert!(
        message.contains("gateway.tokenReview.enabled") && message.contains("apiKeys"),
        "{message}"
    );
    // Nothing was granted.
    assert!(
        Api::<ServiceAccount>::namespaced(client.clone(), &ns)
            .get_opt("chat-gateway")
            .await
            .unwrap()
            .is_none()
    );
    // API keys need no grant: the endpoint serves.
    support::apply(
        &ns,
        &yaml("    apiKeys: [{name: ci, secretRef: {name: llm-keys, key: openai}}]\n"),
    );
    support::wait_condition(&endpoints, "chat", "Ready", "True", None, 90).await;
}

#[tokio::test]
async fn a_bad_access_declaration_is_rejected_at_apply_saying_what_to_fix() {
    support::install_crds();
    let client = cluster().client().await;
    let ns = support::namespace(&client, "callers-admission").await;
    let rejected = |access: &str| {
        let m = format!(
            "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: ep}}\nspec:\n  models:\n    - {{name: m, provider: ollama, model: x}}\n  access:\n{access}"
        );
        let (ok, out, err) = cluster().kubectl_run(&["apply", "-n", &ns, "-f", "-"], Some(&m));
        assert!(!ok, "accepted:\n{access}\n{out}");
        err
    };
    for (access, says) in [
        (
            "    open: true\n    apiKeys: [{name: ci, secretRef: {name: s, key: k}}]\n",
            "open: true admits anyone",
        ),
        (
            "    apiKeys: [{name: ci, secretRef: {name: s, key: k}}, {name: ci, secretRef: {name: s, key: j}}]\n",
            "apiKeys names must be unique",
        ),
        (
            "    serviceAccounts: {audience: x}\n",
            "serviceAccounts needs namespaces",
        ),
        (
            "    serviceAccounts: {names: [agent]}\n",
            "spec.access.serviceAccounts.names[0]",
        ),
        (
            "    apiKeys: [{name: ci, secretRef: {name: s, key: k}}]\n    networkPolicy: {}\n",
            "networkPolicy admits the namespaces of serviceAccounts",
        ),
    ] {
        let err = rejected(access);
        assert!(err.contains(says), "expected {says:?} in:\n{err}");
    }
}
