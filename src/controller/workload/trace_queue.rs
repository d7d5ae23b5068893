//! The gateway pods' trace queue: an emptyDir the gateway keeps undelivered traces in (so a
//! container restart loses none), its size bound, and the export mode, as the Deployment carries
//! them. Apart from [`super::render`] because it is one concern with its own settings (the
//! endpoint's `spec.tracing.queueSize` and `exportMode`, the operator's default mode).

use k8s_openapi::api::core::v1::{EmptyDirVolumeSource, EnvVar, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use crate::api::{self, ExportMode, GatewayEndpoint};

/// The volume's name, and where the gateway container mounts it.
pub const VOLUME: &str = "trace-queue";
pub const MOUNT_PATH: &str = "/var/lib/mlflow-gateway/trace-queue";
/// The gateway's variables (its contract with the operator).
pub const ENV_DIR: &str = "GATEWAY_TRACE_QUEUE_DIR";
pub const ENV_MAX_BYTES: &str = "GATEWAY_TRACE_QUEUE_MAX_BYTES";
pub const ENV_EXPORT_MODE: &str = "GATEWAY_TRACE_EXPORT_MODE";
/// Room on the volume beyond the queue's bound, for what the bound does not count (a segment
/// being written and the cursor file), so the kubelet never evicts a pod whose queue is within it.
const SLACK_BYTES: u64 = 16 << 20;

/// The queue's bound in bytes: the endpoint's `queueSize`, or the default for a value the API
/// server would not have admitted (a manifest that never went through it).
pub fn max_bytes(ep: &GatewayEndpoint) -> u64 {
    api::quantity_bytes(&ep.spec.tracing.queue_size)
        .or_else(|| api::quantity_bytes(api::DEFAULT_QUEUE_SIZE))
        .unwrap_or(256 << 20)
}

/// The export mode the pods are told: the endpoint's, else the operator's; None leaves it to the
/// gateway's own default.
pub fn export_mode(
    ep: &GatewayEndpoint,
    operator_default: Option<ExportMode>,
) -> Option<ExportMode> {
    ep.spec.tracing.export_mode.or(operator_default)
}

/// The variables for a traced endpoint (none when the pods trace nothing).
pub fn environment(
    ep: &GatewayEndpoint,
    operator_default: Option<ExportMode>,
    traced: bool,
) -> Vec<EnvVar> {
    if !traced {
        return Vec::new();
    }
    let plain = |name: &str, value: String| EnvVar {
        name: name.into(),
        value: Some(value),
        ..Default::default()
    };
    let mut env = vec![
        plain(ENV_DIR, MOUNT_PATH.into()),
        plain(ENV_MAX_BYTES, max_bytes(ep).to_string()),
    ];
    if let Some(mode) = export_mode(ep, operator_default) {
        env.push(plain(ENV_EXPORT_MODE, mode.env_value().into()));
    }
    env
}

/// The emptyDir, sized to the bound plus slack (in Mi when it is a whole number of them, for
/// whoever reads the Deployment).
pub fn volume(ep: &GatewayEndpoint, traced: bool) -> Option<Volume> {
    traced.then(|| Volume {
        name: VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(size_limit(max_bytes(ep))),
            ..Default::default()
        }),
        ..Default::default()
    })
}

pub fn volume_mount(traced: bool) -> Option<VolumeMount> {
    traced.then(|| VolumeMount {
        name: VOLUME.into(),
        mount_path: MOUNT_PATH.into(),
        ..Default::default()
    })
}

fn size_limit(max_bytes: u64) -> Quantity {
    let bytes = max_bytes.saturating_add(SLACK_BYTES);
    let mi = 1 << 20;
    Quantity(if bytes.is_multiple_of(mi) {
        format!("{}Mi", bytes / mi)
    } else {
        bytes.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(tracing: &str) -> GatewayEndpoint {
        serde_yaml::from_str(&format!(
            "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: chat, namespace: a}}\nspec:\n  models: [{{name: m, provider: ollama, model: x}}]\n  tracing: {{{tracing}}}\n"
        ))
        .unwrap()
    }

    fn env(ep: &GatewayEndpoint, default: Option<ExportMode>) -> Vec<(String, String)> {
        environment(ep, default, true)
            .into_iter()
            .map(|e| (e.name, e.value.unwrap_or_default()))
            .collect()
    }

    #[test]
    fn the_default_queue_is_256_mib_on_a_272_mib_volume_and_the_mode_is_left_to_the_gateway() {
        let ep = endpoint("");
        assert_eq!(
            env(&ep, None),
            [
                (ENV_DIR.to_string(), MOUNT_PATH.to_string()),
                (ENV_MAX_BYTES.to_string(), "268435456".to_string()),
            ]
        );
        let v = volume(&ep, true).unwrap();
        assert_eq!(v.name, "trace-queue");
        assert_eq!(
            v.empty_dir.unwrap().size_limit,
            Some(Quantity("272Mi".into()))
        );
        assert_eq!(volume_mount(true).unwrap().mount_path, MOUNT_PATH);
    }

    #[test]
    fn the_endpoints_size_and_mode_win_over_the_operators_default() {
        let ep = endpoint("queueSize: 1.5Gi, exportMode: InfoThenSpans");
        let e = env(&ep, Some(ExportMode::Adaptive));
        assert!(e.contains(&(ENV_MAX_BYTES.into(), (3u64 << 29).to_string())));
        assert!(e.contains(&(ENV_EXPORT_MODE.into(), "info-then-spans".into())));
        let v = volume(&ep, true).unwrap();
        assert_eq!(
            v.empty_dir.unwrap().size_limit,
            Some(Quantity("1552Mi".into()))
        );
        // The operator's mode when the endpoint names none.
        let e = env(&endpoint("queueSize: 1G"), Some(ExportMode::SpansOnly));
        assert!(e.contains(&(ENV_EXPORT_MODE.into(), "spans-only".into())));
        let v = volume(&endpoint("queueSize: 1G"), true).unwrap();
        assert_eq!(
            v.empty_dir.unwrap().size_limit,
            Some(Quantity((1_000_000_000u64 + (16 << 20)).to_string()))
        );
    }

    #[test]
    fn no_tracing_no_queue() {
        let ep = endpoint("exportMode: Adaptive");
        assert!(environment(&ep, Some(ExportMode::Adaptive), false).is_empty());
        assert!(volume(&ep, false).is_none());
        assert!(volume_mount(false).is_none());
    }

    #[test]
    fn a_size_the_api_server_would_refuse_falls_back_to_the_default() {
        assert_eq!(max_bytes(&endpoint("queueSize: 1e9")), 256 << 20);
    }
}
