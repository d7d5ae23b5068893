//! The chart's ValidatingAdmissionPolicy on the real API server, asked by users who are not
//! admins (kubectl `--as`, so RBAC and the CEL authorizer judge that user): an endpoint may
//! reference only Secrets its author may get, a custom gateway image needs the verb
//! `use-custom-image`, and the aggregated roles grant what the README says.
//!
//! Each test installs the chart (a release of its own, its binding limited to the test's
//! namespace by `controller.watchNamespace`), so tests running at once never judge each other's
//! requests. The operator itself does not run: admission happens before it. One more test checks
//! the rendered policy and its Kubernetes floor.

use crate::support;

use crate::helm::{chart, ci_values, documents, find, template};
use support::{cluster, eventually};

/// A release of the chart, installed without waiting for its (kwok-scheduled) pods.
pub(crate) struct Release {
    pub name: String,
    pub namespace: String,
    pub fullname: String,
}

/// `helm install` of the chart into `rel_ns` with the required values plus `sets`.
pub(crate) fn install(rel_ns: &str, sets: &[&str]) -> Release {
    support::install_crds();
    let name = format!("mgo-{}", support::suffix());
    let chart = chart();
    let mut args = vec![
        "install",
        name.as_str(),
        chart.to_str().unwrap(),
        "--namespace",
        rel_ns,
        "--set",
        "image.repository=registry.example.com/mlflow-gateway-operator",
        "--set",
        "mlflow.trackingUri=http://mlflow.mlflow.svc.cluster.local:5000",
        "--set",
        "replicaCount=1",
    ];
    for s in sets {
        args.extend(["--set", s]);
    }
    let (ok, out, err) = cluster().helm(&args);
    assert!(ok, "helm install failed:\n{out}\n{err}");
    Release {
        fullname: format!("{name}-mlflow-gateway-operator"),
        name,
        namespace: rel_ns.to_string(),
    }
}

impl Release {
    pub fn uninstall(&self) {
        let (ok, out, err) = cluster().helm(&["uninstall", &self.name, "-n", &self.namespace]);
        assert!(ok, "helm uninstall failed:\n{out}\n{err}");
    }
}

/// kubectl as the admin; panics with its output if it fails.
pub(crate) fn admin(args: &[&str]) {
    let (ok, out, err) = cluster().kubectl_run(args, None);
    assert!(ok, "kubectl {args:?} failed:\n{out}\n{err}");
}

/// `kubectl auth can-i VERB RESOURCE -n NS --as=USER`: true for "yes". RESOURCE may be
/// `resource/name`, or end in `/status` or `/finalizers` for that subresource.
pub(crate) fn can_i(user: &str, ns: Option<&str>, verb: &str, resource: &str) -> bool {
    let (resource, subresource) = match resource.rsplit_once('/') {
        Some((r, sub @ ("status" | "finalizers"))) => (r, Some(sub)),
        _ => (resource, None),
    };
    let mut args = vec!["auth", "can-i", verb, resource, "--as", user];
    if let Some(sub) = subresource {
        args.extend(["--subresource", sub]);
    }
    match ns {
        Some(ns) => args.extend(["-n", ns]),
        None => args.push("--all-namespaces"),
    }
    let (_, out, err) = cluster().kubectl_run(&args, None);
    match out.trim() {
        "yes" => true,
        "no" => false,
        other => panic!("kubectl {args:?}: {other:?} {err}"),
    }
}

/// A GatewayEndpoint manifest: `models` as (model name, Secret name), then `extra` spec lines.
fn endpoint(name: &str, models: &[(&str, &str)], extra: &str) -> String {
    let mut m = String::new();
    for (model, secret) in models {
        m.push_str(&format!(
            "    - {{name: {model}, provider: openai, model: gpt-4o-mini, apiKeySecretRef: {{name: {secret}, key: openai}}}}\n"
        ));
    }
    format!(
        "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata:\n  name: {name}\nspec:\n  models:\n{m}{extra}"
    )
}

/// `kubectl <verb> -n ns --as=user -f -` of `manifest`: Ok(stdout) or Err(stderr).
fn submit(user: &str, ns: &str, verb: &str, manifest: &str) -> Result<String, String> {
    let (ok, out, err) =
        cluster().kubectl_run(&[verb, "-n", ns, "--as", user, "-f", "-"], Some(manifest));
    if ok { Ok(out) } else { Err(err) }
}

fn refused(user: &str, ns: &str, verb: &str, manifest: &str) -> String {
    let err =
        submit(user, ns, verb, manifest).expect_err(&format!("accepted from {user}:\n{manifest}"));
    assert!(
        err.contains("denied request") && err.contains("forbidden"),
        "not refused by the admission policy:\n{err}"
    );
    err
}

fn assert_says(err: &str, wanted: &str) {
    assert!(err.contains(wanted), "expected {wanted:?} in:\n{err}");
}

/// Waits until the release's policy judges requests in `ns`: a server-side dry run of an
/// endpoint referencing `secret` as `user` is refused (a dry run, so that nothing is created
/// while the policy is not loaded yet).
async fn policy_active(user: &str, ns: &str, secret: &str) {
    let probe = endpoint("probe", &[("mini", secret)], "");
    eventually(30, "the admission policy to judge requests", || async {
        let (ok, _, err) = cluster().kubectl_run(
            &[
                "create",
                "--dry-run=server",
                "-n",
                ns,
                "--as",
                user,
                "-f",
                "-",
            ],
            Some(&probe),
        );
        (!ok && err.contains("denied request")).then_some(())
    })
    .await;
}

/// A namespace with the Secrets `team-key` and `private-key`, the chart installed for it, and
/// `user` holding the chart's edit and view roles there plus get on `team-key` only.
async fn setup(user: &str) -> (String, Release) {
    let client = cluster().client().await;
    let ns = support::namespace(&client, "vap").await;
    let rel_ns = support::namespace(&client, "vap-op").await;
    support::secret(&client, &ns, "team-key", &[("openai", "sk-team")]).await;
    support::secret(&client, &ns, "private-key", &[("openai", "sk-private")]).await;
    let release = install(&rel_ns, &[&format!("controller.watchNamespace={ns}")]);
    for role in ["edit", "view"] {
        admin(&[
            "create",
            "rolebinding",
            &format!("{user}-{role}"),
            "-n",
            &ns,
            &format!("--clusterrole={}-{role}", release.fullname),
            &format!("--user={user}"),
        ]);
    }
    admin(&[
        "create",
        "role",
        "team-key",
        "-n",
        &ns,
        "--verb=get",
        "--resource=secrets",
        "--resource-name=team-key",
    ]);
    admin(&[
        "create",
        "rolebinding",
        &format!("{user}-team-key"),
        "-n",
        &ns,
        "--role=team-key",
        &format!("--user={user}"),
    ]);
    eventually(30, "the user's RBAC", || async {
        (can_i(
            user,
            Some(&ns),
            "create",
            "gatewayendpoints.mlflow-gateway.dev",
        ) && can_i(user, Some(&ns), "get", "secrets/team-key"))
        .then_some(())
    })
    .await;
    assert!(!can_i(user, Some(&ns), "get", "secrets/private-key"));
    policy_active(user, &ns, "private-key").await;
    (ns, release)
}

#[tokio::test]
async fn an_endpoint_may_reference_only_secrets_its_author_may_get() {
    let (ns, release) = setup("alice").await;

    // A Secret alice may get, even referenced by every model and fallback: accepted.
    let fallbacks: String = (0..16)
        .map(|i| format!("    - {{name: f{i}, provider: openai, model: m, apiKeySecretRef: {{name: team-key, key: openai}}}}\n"))
        .collect();
    let models: Vec<(String, &str)> = (0..16).map(|i| (format!("m{i}"), "team-key")).collect();
    let models: Vec<(&str, &str)> = models.iter().map(|(m, s)| (m.as_str(), *s)).collect();
    submit(
        "alice",
        &ns,
        "create",
        &endpoint("mine", &models, &format!("  fallbacks:\n{fallbacks}")),
    )
    .expect("an endpoint with Secrets alice may get");

    // One she may not get: refused, naming the Secret, the field and the user; nothing created.
    let err = refused(
        "alice",
        &ns,
        "create",
        &endpoint("theirs", &[("mini", "private-key")], ""),
    );
    assert_says(
        &err,
        &format!(
            "spec.models[mini].apiKeySecretRef names Secret private-key, which alice may not get in namespace {ns}"
        ),
    );
    let (found, _, _) =
        cluster().kubectl_run(&["get", "-n", &ns, "gatewayendpoint", "theirs"], None);
    assert!(!found, "a refused endpoint exists");

    // Deep in the list (third reference), in a fallback and as the trace credential at once.
    let err = refused(
        "alice",
        &ns,
        "create",
        &endpoint(
            "deep",
            &[("a", "team-key")],
            "  fallbacks:\n    - {name: f1, provider: openai, model: m, apiKeySecretRef: {name: team-key, key: openai}}\n    - {name: f2, provider: openai, model: m, apiKeySecretRef: {name: private-key, key: openai}}\n  tracing: {credentialsSecretRef: {name: private-key}}\n",
        ),
    );
    assert_says(
        &err,
        "spec.fallbacks[f2].apiKeySecretRef, spec.tracing.credentialsSecretRef names Secret private-key, which alice may not get",
    );
    // A caller's API key (spec.access.apiKeys) is a Secret reference like the others.
    let err = refused(
        "alice",
        &ns,
        "create",
        &endpoint(
            "keys",
            &[("mini", "team-key")],
            "  access:\n    apiKeys: [{name: ci, secretRef: {name: team-key, key: ci}}, {name: ops, secretRef: {name: private-key, key: ops}}]\n",
        ),
    );
    assert_says(
        &err,
        "spec.access.apiKeys[ops].secretRef names Secret private-key, which alice may not get",
    );
    // A Secret that does not exist is judged like any other: no get, no reference.
    let err = refused(
        "alice",
        &ns,
        "create",
        &endpoint("later", &[("mini", "not-yet")], ""),
    );
    assert_says(&err, "names Secret not-yet, which alice may not get");

    // An endpoint the admin made with a Secret alice may not get: she may not change its spec
    // (a new apiBase would send that key elsewhere), but may label it.
    support::apply(&ns, &endpoint("shared", &[("mini", "private-key")], ""));
    let (ok, _, err) = cluster().kubectl_run(
        &[
            "patch", "gatewayendpoint", "shared", "-n", &ns, "--as", "alice", "--type=json", "-p",
            r#"[{"op":"add","path":"/spec/models/0/apiBase","value":"https://collector.example.com/v1"}]"#,
        ],
        None,
    );
    assert!(
        !ok,
        "alice redirected an endpoint keyed by a Secret she may not get"
    );
    assert_says(&err, "names Secret private-key, which alice may not get");
    let (ok, _, err) = cluster().kubectl_run(
        &[
            "label",
            "gatewayendpoint",
            "shared",
            "-n",
            &ns,
            "--as",
            "alice",
            "team=a",
        ],
        None,
    );
    assert!(ok, "a metadata-only change is not judged: {err}");

    // Once she may get it, the same endpoint is accepted.
    admin(&[
        "create",
        "role",
        "private-key",
        "-n",
        &ns,
        "--verb=get",
        "--resource=secrets",
        "--resource-name=private-key",
    ]);
    admin(&[
        "create",
        "rolebinding",
        "alice-private-key",
        "-n",
        &ns,
        "--role=private-key",
        "--user=alice",
    ]);
    let theirs = endpoint("theirs", &[("mini", "private-key")], "");
    eventually(
        30,
        "the endpoint accepted once alice may get the Secret",
        || async { submit("alice", &ns, "create", &theirs).ok() },
    )
    .await;
    release.uninstall();
}

#[tokio::test]
async fn a_custom_gateway_image_needs_the_use_custom_image_verb() {
    let (ns, release) = setup("erin").await;
    let verb_resource = "gatewayendpoints.mlflow-gateway.dev";
    assert!(!can_i("erin", Some(&ns), "use-custom-image", verb_resource));
    let custom = endpoint(
        "custom",
        &[("mini", "team-key")],
        "  gateway: {image: registry.example.com/my-gateway:1}\n",
    );
    let err = refused("erin", &ns, "create", &custom);
    assert_says(
        &err,
        &format!(
            "spec.gateway.image: erin may not set a custom gateway image (registry.example.com/my-gateway:1); it needs the verb use-custom-image on gatewayendpoints.mlflow-gateway.dev in namespace {ns}"
        ),
    );

    // The verb, granted by a Role: accepted.
    admin(&[
        "create",
        "role",
        "custom-image",
        "-n",
        &ns,
        "--verb=use-custom-image",
        "--resource=gatewayendpoints.mlflow-gateway.dev",
    ]);
    admin(&[
        "create",
        "rolebinding",
        "erin-custom-image",
        "-n",
        &ns,
        "--role=custom-image",
        "--user=erin",
    ]);
    eventually(30, "erin holds use-custom-image", || async {
        can_i("erin", Some(&ns), "use-custom-image", verb_resource).then_some(())
    })
    .await;
    submit("erin", &ns, "create", &custom).expect("a custom image with the verb");

    // Someone without the verb may change the rest of that endpoint but not its image.
    for role in ["edit", "view"] {
        admin(&[
            "create",
            "rolebinding",
            &format!("frank-{role}"),
            "-n",
            &ns,
            &format!("--clusterrole={}-{role}", release.fullname),
            "--user=frank",
        ]);
    }
    admin(&[
        "create",
        "rolebinding",
        "frank-team-key",
        "-n",
        &ns,
        "--role=team-key",
        "--user=frank",
    ]);
    let patch = |body: &str| {
        cluster().kubectl_run(
            &[
                "patch",
                "gatewayendpoint",
                "custom",
                "-n",
                &ns,
                "--as",
                "frank",
                "--type=merge",
                "-p",
                body,
            ],
            None,
        )
    };
    eventually(
        30,
        "frank may change the unchanged image's endpoint",
        || async {
            let (ok, _, _) = patch(r#"{"spec":{"replicas":2}}"#);
            ok.then_some(())
        },
    )
    .await;
    let (ok, _, err) = patch(r#"{"spec":{"gateway":{"image":"registry.example.com/other:2"}}}"#);
    assert!(!ok, "frank changed the image without the verb");
    assert_says(
        &err,
        "spec.gateway.image: frank may not set a custom gateway image",
    );
    release.uninstall();
}

/// CEL allows about 28 authorization checks per request. A user limited to named Secrets who
/// references more distinct Secrets than that is refused (the policy fails closed); a user who
/// may get every Secret of the namespace is checked once.
#[tokio::test]
async fn more_named_secrets_than_the_check_budget_fail_closed() {
    let (ns, release) = setup("gina").await;
    let names: Vec<String> = (0..33).map(|i| format!("s{i}")).collect();
    let mut args = vec![
        "create".to_string(),
        "role".into(),
        "many".into(),
        "-n".into(),
        ns.clone(),
        "--verb=get".into(),
        "--resource=secrets".into(),
    ];
    args.extend(names.iter().map(|n| format!("--resource-name={n}")));
    admin(&args.iter().map(String::as_str).collect::<Vec<_>>());
    admin(&[
        "create",
        "rolebinding",
        "gina-many",
        "-n",
        &ns,
        "--role=many",
        "--user=gina",
    ]);
    let many = |name: &str, n: usize| {
        let models: Vec<(String, String)> = (0..n.min(16))
            .map(|i| (format!("m{i}"), names[i].clone()))
            .collect();
        let models: Vec<(&str, &str)> = models
            .iter()
            .map(|(m, s)| (m.as_str(), s.as_str()))
            .collect();
        let fallbacks: String = (16..n)
            .map(|i| format!("    - {{name: m{i}, provider: openai, model: m, apiKeySecretRef: {{name: {}, key: k}}}}\n", names[i]))
            .collect();
        let extra = if fallbacks.is_empty() {
            String::new()
        } else {
            format!("  fallbacks:\n{fallbacks}")
        };
        endpoint(name, &models, &extra)
    };
    eventually(30, "gina's named Secrets", || async {
        can_i("gina", Some(&ns), "get", "secrets/s31").then_some(())
    })
    .await;
    submit("gina", &ns, "create", &many("twenty", 20)).expect("20 named Secrets");
    let err = submit("gina", &ns, "create", &many("thirty-two", 32))
        .expect_err("32 named Secrets were admitted");
    assert_says(&err, "running out of cost budget");

    // With get on every Secret of the namespace, one check suffices.
    admin(&[
        "create",
        "role",
        "all-secrets",
        "-n",
        &ns,
        "--verb=get",
        "--resource=secrets",
    ]);
    admin(&[
        "create",
        "rolebinding",
        "gina-all",
        "-n",
        &ns,
        "--role=all-secrets",
        "--user=gina",
    ]);
    let thirty_two = many("thirty-two", 32);
    eventually(30, "32 Secrets accepted with get on all", || async {
        submit("gina", &ns, "create", &thirty_two).ok()
    })
    .await;
    release.uninstall();
}

#[tokio::test]
async fn the_aggregated_roles_grant_what_they_say() {
    let client = cluster().client().await;
    let ns = support::namespace(&client, "roles").await;
    let rel_ns = support::namespace(&client, "roles-op").await;
    let release = install(
        &rel_ns,
        &[
            &format!("controller.watchNamespace={ns}"),
            "admission.enabled=false",
        ],
    );
    for role in ["view", "edit", "admin"] {
        admin(&[
            "create",
            "rolebinding",
            &format!("{role}-user"),
            "-n",
            &ns,
            &format!("--clusterrole={role}"),
            &format!("--user={role}-user"),
        ]);
    }
    let ep = "gatewayendpoints.mlflow-gateway.dev";
    // (user, verb, resource, expected)
    let expected: &[(&str, &str, &str, bool)] = &[
        ("view-user", "get", ep, true),
        ("view-user", "list", ep, true),
        ("view-user", "watch", ep, true),
        (
            "view-user",
            "get",
            "gatewayendpoints.mlflow-gateway.dev/status",
            true,
        ),
        ("view-user", "create", ep, false),
        ("view-user", "use-custom-image", ep, false),
        ("edit-user", "get", ep, true),
        ("edit-user", "create", ep, true),
        ("edit-user", "patch", ep, true),
        ("edit-user", "delete", ep, true),
        ("edit-user", "deletecollection", ep, true),
        ("edit-user", "use-custom-image", ep, false),
        (
            "edit-user",
            "patch",
            "gatewayendpoints.mlflow-gateway.dev/status",
            false,
        ),
        ("admin-user", "create", ep, true),
        ("admin-user", "use-custom-image", ep, true),
    ];
    // The built-in roles pick the chart's up through the aggregation controller.
    eventually(60, "the built-in roles aggregated", || async {
        expected
            .iter()
            .all(|(u, v, r, want)| can_i(u, Some(&ns), v, r) == *want)
            .then_some(())
    })
    .await;
    for (u, v, r, want) in expected {
        assert_eq!(can_i(u, Some(&ns), v, r), *want, "{u} {v} {r}");
    }
    // Only in the namespace of the binding.
    let other = support::namespace(&client, "roles-other").await;
    assert!(!can_i("admin-user", Some(&other), "get", ep));
    release.uninstall();
}

/// The policy renders for Kubernetes 1.30+ and refuses to render, saying why, for older ones.
#[test]
fn the_admission_policy_needs_kubernetes_1_30() {
    let values = ci_values("default-values.yaml");
    let out = template("ops", &["-f", &values]).unwrap();
    let docs = documents(&out);
    let policy = find(&docs, "ValidatingAdmissionPolicy")[0];
    let validations = policy["spec"]["validations"].as_sequence().unwrap();
    // The size guard, one per possible Secret reference (16 models, 16 fallbacks, 1 credential,
    // 64 callers' API keys), the image rule.
    assert_eq!(validations.len(), 1 + 97 + 1);
    assert!(find(&docs, "ValidatingAdmissionPolicyBinding")[0]["spec"]["matchResources"].is_null());
    let chart = chart();
    let (ok, _, err) = cluster().helm(&[
        "template",
        "rel",
        chart.to_str().unwrap(),
        "--namespace",
        "ops",
        "--kube-version",
        "v1.29.0",
        "-f",
        &values,
    ]);
    assert!(!ok);
    assert!(
        err.contains("the ValidatingAdmissionPolicy needs Kubernetes 1.30 or later"),
        "{err}"
    );
    let out = template("ops", &["-f", &values, "--set", "admission.enabled=false"]).unwrap();
    assert!(find(&documents(&out), "ValidatingAdmissionPolicy").is_empty());
}
