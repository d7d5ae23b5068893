//! Why the gateway pods do not become available, when the reason is the gateway itself: a
//! container that exits (the gateway refuses its config at start, say, and writes why to stderr,
//! which `terminationMessagePolicy: FallbackToLogsOnError` turns into the termination message).
//! The Deployment only says "unavailable"; the pods say why. Read only while pods are unavailable,
//! so a serving endpoint costs no extra request; a failure to read pods is no failure of the
//! reconcile (the Deployment's own conditions stand).

use k8s_openapi::api::core::v1::Pod;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use tracing::debug;

use super::render;
use crate::api::GatewayEndpoint;
use crate::controller::context::Context;

/// The longest termination message quoted in status (the kubelet keeps up to 4096 bytes).
const MAX_QUOTED: usize = 1024;

/// The first gateway container among `pods` that has exited with a failure and is restarting (or
/// waiting to), said as `pod <name>: the gateway exits with code <n>: <termination message>`.
/// Nothing that changes on every restart (counts, times) is in it, so one crash loop is one
/// message.
pub fn crash_of(pods: &[Pod]) -> Option<String> {
    pods.iter().find_map(|pod| {
        let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
        statuses.iter().find_map(|c| {
            if c.ready {
                return None;
            }
            let terminated = c
                .state
                .as_ref()
                .and_then(|s| s.terminated.as_ref())
                .or_else(|| c.last_state.as_ref()?.terminated.as_ref())
                .filter(|t| t.exit_code != 0)?;
            let text = terminated
                .message
                .as_deref()
                .map(str::trim)
                .filter(|m| !m.is_empty())
                .map_or_else(
                    || {
                        terminated
                            .reason
                            .clone()
                            .unwrap_or_else(|| "no message".into())
                    },
                    |m| crate::text::truncate(last_lines(m), MAX_QUOTED),
                );
            Some(format!(
                "pod {}: the gateway exits with code {}: {text}",
                pod.name_any(),
                terminated.exit_code
            ))
        })
    })
}

/// The end of a log-sized message: its last three lines (the refusal is the last thing logged).
fn last_lines(m: &str) -> &str {
    let mut start = m.len();
    for _ in 0..3 {
        match m[..start].rfind('\n') {
            Some(i) => start = i,
            None => return m,
        }
    }
    m[start..].trim_start()
}

/// Reads the endpoint's pods and returns [`crash_of`] them; None when they cannot be read.
pub async fn find_crash(ctx: &Context, ep: &GatewayEndpoint) -> Option<String> {
    let ns = ep.namespace()?;
    let selector = render::selector_labels(ep)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",");
    match Api::<Pod>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default().labels(&selector))
        .await
    {
        Ok(pods) => crash_of(&pods.items),
        Err(e) => {
            debug!(error = %e, "could not read the gateway pods");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "chat-7d9f-abcde"},
            "status": {"containerStatuses": [status]}
        }))
        .unwrap()
    }

    #[test]
    fn a_crash_loop_quotes_the_termination_message() {
        let crashing = pod(serde_json::json!({
            "name": "gateway", "ready": false, "restartCount": 4, "image": "i", "imageID": "",
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1, "reason": "Error",
                "message": "starting\nloading config\nmore\nerror: GATEWAY_API_KEY_MINI: invalid API key value\n"}}
        }));
        assert_eq!(
            crash_of(&[crashing]).as_deref(),
            Some(
                "pod chat-7d9f-abcde: the gateway exits with code 1: loading config\nmore\nerror: GATEWAY_API_KEY_MINI: invalid API key value"
            )
        );
    }

    #[test]
    fn running_or_starting_pods_are_no_crash() {
        let running = pod(serde_json::json!({
            "name": "gateway", "ready": true, "restartCount": 0, "image": "i", "imageID": "",
            "state": {"running": {}}
        }));
        let starting = pod(serde_json::json!({
            "name": "gateway", "ready": false, "restartCount": 0, "image": "i", "imageID": "",
            "state": {"waiting": {"reason": "ContainerCreating"}}
        }));
        let oom_recovered = pod(serde_json::json!({
            "name": "gateway", "ready": true, "restartCount": 1, "image": "i", "imageID": "",
            "state": {"running": {}},
            "lastState": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
        }));
        assert_eq!(crash_of(&[running, starting, oom_recovered]), None);
        let no_message = pod(serde_json::json!({
            "name": "gateway", "ready": false, "restartCount": 1, "image": "i", "imageID": "",
            "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
        }));
        assert_eq!(
            crash_of(&[no_message]).as_deref(),
            Some("pod chat-7d9f-abcde: the gateway exits with code 137: OOMKilled")
        );
    }
}
