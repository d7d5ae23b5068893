//! Whether an owned object still holds what the operator declares, without a write: the hash of
//! what was applied (an annotation on the object) and a comparison that ignores what the API
//! server and other managers add. Pure; [`super::apply`] decides from it whether to apply.

use kube::{Resource, ResourceExt};
use serde_json::Value;

use super::render::{ANNOTATION_APPLIED, sha256_hex};

/// Stamps `obj` with [`ANNOTATION_APPLIED`]: the hash of everything else the operator declares in
/// it, so a later change of the operator's mind is seen without comparing whole objects.
pub fn stamp<K: Resource + serde::Serialize>(mut obj: K) -> Result<K, serde_json::Error> {
    obj.annotations_mut().remove(ANNOTATION_APPLIED);
    let hash = sha256_hex(&[serde_json::to_vec(&obj)?.as_slice()]);
    obj.annotations_mut()
        .insert(ANNOTATION_APPLIED.to_string(), hash);
    Ok(obj)
}

/// Whether `actual` no longer holds what `desired` declares: every field set in `desired` must
/// have the same value in `actual` (the API server adds defaults, other managers add fields: those
/// are not drift). Lists match element by element in order, and may go on with elements others
/// added (an injected sidecar); quantities under `resources` compare by value (`0.5` is `500m`).
/// The operator's own changes show through [`ANNOTATION_APPLIED`].
pub fn drifted(desired: &Value, actual: &Value) -> bool {
    !contains(desired, actual, false)
}

fn contains(desired: &Value, actual: &Value, quantities: bool) -> bool {
    match (desired, actual) {
        (Value::Object(d), Value::Object(a)) => d.iter().all(|(k, dv)| {
            if dv.is_null() {
                return true;
            }
            a.get(k)
                .is_some_and(|av| contains(dv, av, quantities || k == "resources"))
        }),
        (Value::Array(d), Value::Array(a)) => {
            d.len() <= a.len() && d.iter().zip(a).all(|(dv, av)| contains(dv, av, quantities))
        }
        (Value::String(d), Value::String(a)) if quantities && d != a => {
            match (parse_quantity(d), parse_quantity(a)) {
                (Some(x), Some(y)) => (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs()) * 4.0,
                _ => false,
            }
        }
        _ => desired == actual,
    }
}

/// A Kubernetes quantity as a number: `100m`, `1.5`, `64Mi`, `2G`, `1e3`.
fn parse_quantity(s: &str) -> Option<f64> {
    const SUFFIXES: [(&str, f64); 16] = [
        ("Ki", 1024.0),
        ("Mi", 1_048_576.0),
        ("Gi", 1_073_741_824.0),
        ("Ti", 1_099_511_627_776.0),
        ("Pi", 1_125_899_906_842_624.0),
        ("Ei", 1_152_921_504_606_846_976.0),
        ("n", 1e-9),
        ("u", 1e-6),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
        ("", 1.0),
    ];
    let s = s.trim();
    SUFFIXES.iter().find_map(|(suffix, factor)| {
        let number = s.strip_suffix(suffix)?;
        if number.is_empty() || number.ends_with(['e', 'E']) && !suffix.is_empty() {
            return None;
        }
        number.parse::<f64>().ok().map(|n| n * factor)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn endpoint() -> crate::api::GatewayEndpoint {
        serde_yaml::from_str(
            r#"
apiVersion: mlflow-gateway.dev/v1alpha1
kind: GatewayEndpoint
metadata: {name: chat, namespace: team-a, uid: 1234-abcd, generation: 3}
spec:
  models:
    - {name: mini, provider: openai, model: gpt-4o-mini, apiKeySecretRef: {name: llm-keys, key: openai}}
"#,
        )
        .unwrap()
    }

    fn config_map(
        ep: &crate::api::GatewayEndpoint,
        config: &str,
    ) -> k8s_openapi::api::core::v1::ConfigMap {
        super::super::render::config_map(ep, config, None)
    }

    #[test]
    fn drift_ignores_defaults_and_sees_edits() {
        let desired = json!({"spec": {"replicas": 2, "template": {"containers": [{"image": "a", "resources": {"limits": {"cpu": "0.5", "memory": "1Gi"}}}]}}});
        let defaulted = json!({"spec": {"replicas": 2, "progressDeadlineSeconds": 600, "template": {"containers": [{"image": "a", "imagePullPolicy": "IfNotPresent", "resources": {"limits": {"cpu": "500m", "memory": "1024Mi"}}}]}}});
        assert!(!drifted(&desired, &defaulted));
        let edited = json!({"spec": {"replicas": 5, "template": {"containers": [{"image": "a", "resources": {"limits": {"cpu": "500m", "memory": "1Gi"}}}]}}});
        assert!(drifted(&desired, &edited));
        let sidecar = json!({"spec": {"replicas": 2, "template": {"containers": [{"image": "a", "resources": {"limits": {"cpu": "500m", "memory": "1Gi"}}}, {"image": "b"}]}}});
        assert!(!drifted(&desired, &sidecar));
        let removed = json!({"spec": {"replicas": 2, "template": {"containers": []}}});
        assert!(drifted(&desired, &removed));
        // Outside resources, strings compare as strings.
        assert!(drifted(&json!({"a": "1"}), &json!({"a": "1.0"})));
        assert!(drifted(
            &json!({"resources": {"cpu": "1"}}),
            &json!({"resources": {"cpu": "2"}})
        ));
    }

    #[test]
    fn quantities_parse_with_suffixes() {
        assert_eq!(parse_quantity("100m"), Some(0.1));
        assert_eq!(parse_quantity("64Mi"), Some(64.0 * 1_048_576.0));
        assert_eq!(parse_quantity("2G"), Some(2e9));
        assert_eq!(parse_quantity("1e3"), Some(1000.0));
        assert_eq!(parse_quantity("abc"), None);
    }

    #[test]
    fn stamp_hash_follows_content() {
        let ep = endpoint();
        let a = stamp(config_map(&ep, "x")).unwrap();
        let b = stamp(config_map(&ep, "y")).unwrap();
        let a2 = stamp(a.clone()).unwrap();
        assert_eq!(
            a.annotations()[ANNOTATION_APPLIED],
            a2.annotations()[ANNOTATION_APPLIED]
        );
        assert_ne!(
            a.annotations()[ANNOTATION_APPLIED],
            b.annotations()[ANNOTATION_APPLIED]
        );
    }
}
