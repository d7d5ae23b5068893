//! The trace credential of an endpoint's pods: one MLflow user per endpoint when the operator's
//! MLflow account may manage users, else the mirrored operator-wide credential (the fallback).
//! This module decides which ([`Mode`], from a cached probe of `users/current`), keeps the user
//! (random password, EDIT on the endpoint's experiment only, re-granted when the experiment
//! changes, a new password when the endpoint's rotate annotation changes), renders the Secret
//! that holds it, and deletes the user when the endpoint no longer needs it. It returns what it
//! decided as a [`CredentialStep`]; the workload applies the Secret and points the pods at it.
//!
//! The Secret is the one place the password lives: the operator reads it back on each reconcile
//! rather than keeping passwords in memory, so a restart keeps the same password. MLflow is only
//! asked again when something changed (a new experiment, a new password, the Secret gone) or the
//! memory of the last check is older than half a resync period.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};

use super::conditions::{ConditionState, ConditionType, Reason};
use super::context::Context;
use super::error::Error;
use super::settings::TraceCredentials;
use super::workload::render::{self, CREDENTIAL_PASSWORD, CREDENTIAL_USERNAME};
use crate::api::{GatewayEndpoint, GatewayEndpointStatus};
use crate::mlflow::{Account, MlflowClient, MlflowError, Permission};

/// Set it on an endpoint to any new value to get a new password (the pods roll).
pub const ROTATE_ANNOTATION: &str = "mlflow-gateway.dev/rotate-credential";
/// On the Secret: which value of [`ROTATE_ANNOTATION`] its password was made for.
const ROTATED_FOR_ANNOTATION: &str = "mlflow-gateway.dev/rotated-for";
/// On the Secret: what kind of credential it holds (`per-endpoint`; a mirror has none).
const KIND_ANNOTATION: &str = "mlflow-gateway.dev/credential";
const PER_ENDPOINT: &str = "per-endpoint";
/// On the Secret once its user is deleted while the endpoint stays.
const RELEASED: &str = "released";
/// MLflow's username column holds 255 characters.
const MAX_USERNAME: usize = 255;

/// The MLflow username of an endpoint's credential: `gateway-endpoint/<namespace>/<name>`,
/// readable in MLflow's permission lists. No ':' can occur in it (Kubernetes names have none;
/// Basic auth could not carry one). An endpoint name too long for MLflow's column falls back to
/// `gateway-endpoint/<uid>`.
pub fn username(namespace: &str, name: &str, uid: &str) -> String {
    let readable = format!("gateway-endpoint/{namespace}/{name}");
    if readable.len() <= MAX_USERNAME {
        readable
    } else {
        format!("gateway-endpoint/{uid}")
    }
}

/// Where the pods' credential comes from, as decided for this reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// An MLflow user of this endpoint's own.
    PerEndpoint,
    /// The operator-wide credential mirrored (or none configured); `why` the user API is not used.
    Mirrored { why: String },
}

/// The mode from the settings and what the operator's account is.
pub fn mode(setting: TraceCredentials, account: &Account) -> Mode {
    match (setting, account) {
        (TraceCredentials::Mirrored, _) => Mode::Mirrored {
            why: "GATEWAY_TRACE_CREDENTIALS is mirrored".into(),
        },
        (TraceCredentials::Auto, Account::Admin { .. }) => Mode::PerEndpoint,
        (TraceCredentials::Auto, Account::NotAdmin { username }) => Mode::Mirrored {
            why: format!(
                "the operator's MLflow account {username} is not an MLflow admin, so it cannot manage users"
            ),
        },
        (TraceCredentials::Auto, Account::NoUsersApi) => Mode::Mirrored {
            why: "the tracking server has no users API (it runs without MLflow's basic-auth app)"
                .into(),
        },
    }
}

/// The probe of the operator's account, cached: one `users/current` per TTL, whatever the number
/// of endpoints.
pub struct AccountProbe {
    ttl: Duration,
    last: tokio::sync::Mutex<Option<(Instant, Account)>>,
}

impl AccountProbe {
    pub fn new(ttl: Duration) -> Self {
        AccountProbe {
            ttl,
            last: tokio::sync::Mutex::new(None),
        }
    }

    /// The last answer of the probe, if any (without asking MLflow).
    pub async fn last_known(&self) -> Option<Account> {
        self.last.lock().await.as_ref().map(|(_, a)| a.clone())
    }

    /// The operator's account, probed again when the last answer is older than the TTL. While
    /// the server cannot be asked, the last answer holds (an outage does not switch modes).
    pub async fn account(&self, tracking: &MlflowClient) -> Result<Account, MlflowError> {
        let mut last = self.last.lock().await;
        if let Some((at, account)) = last.as_ref()
            && at.elapsed() < self.ttl
        {
            return Ok(account.clone());
        }
        match tracking.current_account().await {
            Ok(account) => {
                *last = Some((Instant::now(), account.clone()));
                Ok(account)
            }
            Err(e) => match last.as_ref() {
                Some((_, account)) if e.is_transient() => Ok(account.clone()),
                _ => Err(e),
            },
        }
    }
}

/// What was last made true in MLflow for one endpoint: its user, with the password whose digest
/// this is, holds EDIT on this experiment.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ensured {
    username: String,
    experiment_id: String,
    digest: String,
}

/// The memory of [`Ensured`] by endpoint uid, each with when it was checked.
pub struct EnsuredCredentials {
    ttl: Duration,
    map: Mutex<HashMap<String, (Instant, Ensured)>>,
}

impl EnsuredCredentials {
    pub fn new(ttl: Duration) -> Self {
        EnsuredCredentials {
            ttl,
            map: Mutex::default(),
        }
    }

    fn recent(&self, uid: &str, wanted: &Ensured) -> bool {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(uid)
            .is_some_and(|(at, e)| e == wanted && at.elapsed() < self.ttl)
    }

    fn record(&self, uid: &str, ensured: Option<Ensured>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match ensured {
            Some(e) => map.insert(uid.to_string(), (Instant::now(), e)),
            None => map.remove(uid),
        };
    }

    /// Forgets endpoint `uid` (cleaned up).
    pub fn forget(&self, uid: &str) {
        self.record(uid, None);
    }

    /// Forgets every endpoint whose uid is not in `live`.
    pub fn retain(&self, live: &HashSet<String>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|uid, _| live.contains(uid));
    }
}

/// The per-endpoint credential as the pods get it: the Secret to apply, and a version of its
/// content for the config hash (so a new password rolls the pods).
#[derive(Clone, Debug)]
pub struct Provided {
    pub secret: Secret,
    pub version: String,
}

/// What the pods' credential is, for the Secrets step.
#[derive(Clone, Debug)]
pub enum Managed {
    /// Not this module's: the endpoint's own Secret, the mirror, or none (as before).
    No,
    /// The per-endpoint credential, in this Secret.
    Provided(Box<Provided>),
    /// The per-endpoint credential is not there yet and cannot be made now: the Deployment waits.
    Unavailable(String),
    /// The per-endpoint credential waits for the experiment (the pods do as well).
    Pending,
}

/// What the credential step decided.
pub struct CredentialStep {
    pub condition: ConditionState,
    pub managed: Managed,
    pub events: Vec<Event>,
    pub failure: Option<Error>,
}

fn condition(status: bool, reason: Reason, message: String) -> ConditionState {
    ConditionState::new(ConditionType::TraceCredentialReady, status, reason, message)
}

fn event(type_: EventType, reason: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.into(),
        note: Some(note),
        action: "EnsureTraceCredential".into(),
        secondary: None,
    }
}

/// A digest of a credential, for the config hash and the memory: never the password itself.
fn digest(username: &str, password: &str) -> String {
    let hex = render::sha256_hex(&[username.as_bytes(), b"\0", password.as_bytes()]);
    hex.chars().take(16).collect()
}

/// The Secret holding the per-endpoint credential, owned by the endpoint.
pub fn credential_secret(
    ep: &GatewayEndpoint,
    username: &str,
    password: &str,
    rotated_for: &str,
) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(render::credential_secret_name(ep)),
            namespace: ep.namespace(),
            labels: Some(render::labels(ep)),
            annotations: Some(BTreeMap::from([
                (KIND_ANNOTATION.to_string(), PER_ENDPOINT.to_string()),
                (ROTATED_FOR_ANNOTATION.to_string(), rotated_for.to_string()),
            ])),
            owner_references: Some(vec![render::owner_reference(ep)]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([
            (
                CREDENTIAL_USERNAME.to_string(),
                ByteString(username.as_bytes().to_vec()),
            ),
            (
                CREDENTIAL_PASSWORD.to_string(),
                ByteString(password.as_bytes().to_vec()),
            ),
        ])),
        ..Default::default()
    }
}

/// The password of `existing` if it is this endpoint's per-endpoint credential for `username`,
/// made for the current value of the rotate annotation; None when a new one is needed.
pub fn reusable_password(
    ep: &GatewayEndpoint,
    existing: &Secret,
    username: &str,
    rotate: &str,
) -> Option<String> {
    let annotations = existing.annotations();
    let ours = render::is_owned_by(&existing.metadata, ep)
        && annotations.get(KIND_ANNOTATION).map(String::as_str) == Some(PER_ENDPOINT)
        && annotations.get(ROTATED_FOR_ANNOTATION).map(String::as_str) == Some(rotate);
    let data = existing.data.as_ref()?;
    let user = data.get(CREDENTIAL_USERNAME)?;
    let password = String::from_utf8(data.get(CREDENTIAL_PASSWORD)?.0.clone()).ok()?;
    (ours && user.0 == username.as_bytes() && password.len() >= 12).then_some(password)
}

/// Whether the endpoint's pods trace with a credential this module manages (tracking on, no
/// Secret of the endpoint's own).
fn wants_own_user(ep: &GatewayEndpoint) -> bool {
    ep.spec.usage_tracking && ep.spec.tracing.credentials_secret_ref.is_none()
}

/// Decides and ensures the pods' trace credential. `experiment_id`: where the pods trace, if
/// known. `tracking_failed`: the experiment step could not reach the tracking server (or was
/// refused): then MLflow is not asked again, the pods keep the credential they have, and the
/// experiment's failure is the one retried. Never fails the reconcile itself: a failure is in
/// the step, to retry with backoff. `tracking` is the client the reconcile passes in (scoped to
/// the endpoint's MLflow workspace, if any): users and grants are made through it.
pub async fn ensure(
    ep: &GatewayEndpoint,
    ctx: &Context,
    tracking: &MlflowClient,
    current: &GatewayEndpointStatus,
    experiment_id: Option<&str>,
    tracking_failed: bool,
) -> CredentialStep {
    let ns = ep.namespace().unwrap_or_default();
    let name = ep.name_any();
    let uid = ep.uid().unwrap_or_default();
    let user = username(&ns, &name, &uid);
    if tracking_failed && wants_own_user(ep) {
        return hold(ep, ctx, &user).await;
    }
    let mut step = decide_and_ensure(ep, ctx, tracking, &user, experiment_id).await;
    // A user made earlier that the endpoint no longer needs (tracking off, or its own Secret).
    if !wants_own_user(ep) {
        match release(ep, ctx, tracking, false).await {
            Ok(Some(note)) => {
                step.events
                    .push(event(EventType::Normal, "TraceCredentialDeleted", note))
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(endpoint = %format!("{}/{}", ns, name), error = %e, "could not delete the endpoint's MLflow user");
                step.failure = Some(e);
            }
        }
    }
    // A Normal Event when the mode changes (or is first known), a Warning on entering a failure.
    let previous = current.condition(ConditionType::TraceCredentialReady.as_str());
    if step.condition.status {
        if previous.is_none_or(|c| c.reason != step.condition.reason.as_str()) {
            step.events.push(event(
                EventType::Normal,
                step.condition.reason.as_str(),
                step.condition.message.clone(),
            ));
        }
    } else if step.condition.reason == Reason::CredentialUnavailable
        && step.failure.is_some()
        && let Some(e) =
            super::events::warn_on_entering(current, &step.condition, "EnsureTraceCredential")
    {
        step.events.push(e);
    }
    step
}

async fn decide_and_ensure(
    ep: &GatewayEndpoint,
    ctx: &Context,
    tracking: &MlflowClient,
    user: &str,
    experiment_id: Option<&str>,
) -> CredentialStep {
    let plain = |reason, message| CredentialStep {
        condition: condition(true, reason, message),
        managed: Managed::No,
        events: Vec::new(),
        failure: None,
    };
    if !ep.spec.usage_tracking {
        return plain(
            Reason::NoCredential,
            "usageTracking is false: the pods write no traces and get no MLflow credential".into(),
        );
    }
    if let Some(r) = &ep.spec.tracing.credentials_secret_ref {
        return plain(
            Reason::EndpointCredential,
            format!(
                "the pods write traces with the credential in Secret {} (tracing.credentialsSecretRef)",
                r.name
            ),
        );
    }
    let account = match ctx.settings.trace_credentials() {
        TraceCredentials::Mirrored => Ok(Account::NoUsersApi),
        TraceCredentials::Auto => ctx.account.account(&ctx.tracking).await,
    };
    let mode = match account {
        Ok(account) => mode(ctx.settings.trace_credentials(), &account),
        Err(e) => return unavailable(ep, ctx, user, e.into()).await,
    };
    if let Mode::Mirrored { why } = mode {
        let secret = render::credential_secret_name(ep);
        return match ctx.settings.gateway_credentials() {
            Some(source) => plain(
                Reason::MirroredCredential,
                format!(
                    "the pods write traces with the operator-wide credential {}/{}, mirrored as Secret {secret}: {why}. It is shared by every endpoint that uses it, with whatever MLflow permissions it has",
                    source.namespace, source.name
                ),
            ),
            None => plain(
                Reason::NoCredential,
                format!(
                    "the pods send no MLflow credential: {why}, and no operator-wide credential is set (GATEWAY_MLFLOW_CREDENTIALS_SECRET)"
                ),
            ),
        };
    }
    let Some(experiment_id) = experiment_id else {
        return CredentialStep {
            condition: condition(
                false,
                Reason::WaitingForExperiment,
                format!("the MLflow user {user} is given its experiment once it is known"),
            ),
            managed: Managed::Pending,
            events: Vec::new(),
            failure: None,
        };
    };
    match ensure_user(ep, ctx, tracking, user, experiment_id).await {
        Ok((provided, events)) => CredentialStep {
            condition: condition(
                true,
                Reason::PerEndpointCredential,
                format!(
                    "the pods write traces as MLflow user {user}, which may edit experiment {experiment_id} only; its password is in Secret {} (annotate the endpoint {ROTATE_ANNOTATION}=<new value> to rotate it)",
                    render::credential_secret_name(ep)
                ),
            ),
            managed: Managed::Provided(Box::new(provided)),
            events,
            failure: None,
        },
        Err(e) => unavailable(ep, ctx, user, e).await,
    }
}

/// The step when the per-endpoint credential cannot be ensured now: the pods keep the Secret
/// they have if it is this endpoint's, else the Deployment waits.
async fn unavailable(ep: &GatewayEndpoint, ctx: &Context, user: &str, e: Error) -> CredentialStep {
    let message =
        format!("the MLflow user {user} could not be ensured: {e}; retrying with backoff");
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ep.namespace().unwrap_or_default());
    let kept = match api.get_opt(&render::credential_secret_name(ep)).await {
        Ok(Some(s)) if render::is_owned_by(&s.metadata, ep) => {
            let rotate = rotate_value(ep);
            let rotated_for = s.annotations().get(ROTATED_FOR_ANNOTATION).cloned();
            reusable_password(ep, &s, user, rotated_for.as_deref().unwrap_or(&rotate)).map(|pw| {
                Provided {
                    secret: credential_secret(
                        ep,
                        user,
                        &pw,
                        rotated_for.as_deref().unwrap_or(&rotate),
                    ),
                    version: digest(user, &pw),
                }
            })
        }
        _ => None,
    };
    CredentialStep {
        condition: condition(false, Reason::CredentialUnavailable, message.clone()),
        managed: match kept {
            Some(p) => Managed::Provided(Box::new(p)),
            None => Managed::Unavailable(message),
        },
        events: Vec::new(),
        failure: Some(e),
    }
}

/// The step while the tracking server fails: the pods keep this endpoint's per-endpoint Secret if
/// it has one, else whatever the Secrets step gives them (the mirror, or none); no MLflow call.
async fn hold(ep: &GatewayEndpoint, ctx: &Context, user: &str) -> CredentialStep {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ep.namespace().unwrap_or_default());
    let kept = match api.get_opt(&render::credential_secret_name(ep)).await {
        Ok(Some(s)) if render::is_owned_by(&s.metadata, ep) => {
            let rotated_for = s
                .annotations()
                .get(ROTATED_FOR_ANNOTATION)
                .cloned()
                .unwrap_or_default();
            reusable_password(ep, &s, user, &rotated_for).map(|pw| Provided {
                secret: credential_secret(ep, user, &pw, &rotated_for),
                version: digest(user, &pw),
            })
        }
        _ => None,
    };
    CredentialStep {
        condition: condition(
            false,
            Reason::CredentialUnavailable,
            "the tracking server is failing (see ExperimentReady): the trace credential is not checked, and the pods keep the one they have".into(),
        ),
        managed: match kept {
            Some(p) => Managed::Provided(Box::new(p)),
            // Per-endpoint mode, no user yet: no mirror meanwhile (the pods wait anyway).
            None if ctx.settings.trace_credentials() == TraceCredentials::Auto
                && matches!(ctx.account.last_known().await, Some(Account::Admin { .. })) =>
            {
                Managed::Pending
            }
            None => Managed::No,
        },
        events: Vec::new(),
        failure: None,
    }
}

fn rotate_value(ep: &GatewayEndpoint) -> String {
    ep.annotations()
        .get(ROTATE_ANNOTATION)
        .cloned()
        .unwrap_or_default()
}

/// Makes MLflow hold the endpoint's user with the Secret's password (a new one when there is no
/// usable Secret or a rotation is asked for) and EDIT on `experiment_id` only.
async fn ensure_user(
    ep: &GatewayEndpoint,
    ctx: &Context,
    tracking: &MlflowClient,
    user: &str,
    experiment_id: &str,
) -> Result<(Provided, Vec<Event>), Error> {
    let ns = ep.namespace().unwrap_or_default();
    let secret_name = render::credential_secret_name(ep);
    let rotate = rotate_value(ep);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let existing = api.get_opt(&secret_name).await?;
    if let Some(s) = &existing
        && !render::is_owned_by(&s.metadata, ep)
    {
        // Someone else's Secret holds the name: touch nothing in MLflow.
        return Err(Error::NameConflict {
            kind: "Secret".into(),
            name: format!("{ns}/{secret_name}"),
        });
    }
    let reused = existing
        .as_ref()
        .and_then(|s| reusable_password(ep, s, user, &rotate));
    let had_secret = existing.is_some();
    let (password, new_password) = match reused {
        Some(pw) => (pw, false),
        None => (
            crate::mlflow::users::random_password()
                .map_err(|_| Error::InvalidResource("the system's random source failed".into()))?,
            true,
        ),
    };
    let wanted = Ensured {
        username: user.to_string(),
        experiment_id: experiment_id.to_string(),
        digest: digest(user, &password),
    };
    let uid = ep.uid().unwrap_or_default();
    let provided = Provided {
        secret: credential_secret(ep, user, &password, &rotate),
        version: wanted.digest.clone(),
    };
    if !new_password && ctx.credentials.recent(&uid, &wanted) {
        return Ok((provided, Vec::new()));
    }
    let mut events = Vec::new();
    if new_password {
        if tracking.create_user(user, &password).await? {
            events.push(event(
                EventType::Normal,
                "TraceCredentialCreated",
                format!("created MLflow user {user} for the pods' traces; its password is in Secret {secret_name}"),
            ));
        } else {
            tracking.update_password(user, &password).await?;
            let why = if had_secret {
                "rotated"
            } else {
                "reset (its Secret was gone)"
            };
            events.push(event(
                EventType::Normal,
                "TraceCredentialRotated",
                format!("{why} the password of MLflow user {user}; the pods roll to the new one in Secret {secret_name}"),
            ));
        }
    } else if !tracking.user_exists(user).await? {
        tracking.create_user(user, &password).await?;
        events.push(event(
            EventType::Normal,
            "TraceCredentialCreated",
            format!("MLflow user {user} was gone; created it again with the password in Secret {secret_name}"),
        ));
    }
    for change in ensure_grant(tracking, user, experiment_id).await? {
        events.push(event(EventType::Normal, "TraceCredentialGranted", change));
    }
    ctx.credentials.record(&uid, Some(wanted));
    Ok((provided, events))
}

/// Makes `user` hold EDIT on `experiment_id` and no other experiment grant; what it changed.
async fn ensure_grant(
    tracking: &MlflowClient,
    user: &str,
    experiment_id: &str,
) -> Result<Vec<String>, MlflowError> {
    let grants = tracking.user_grants(user).await?;
    let mut changes = Vec::new();
    let mut held = false;
    for g in &grants {
        let Some(on) = g.experiment() else { continue };
        if on == experiment_id && g.permission == Permission::Edit.as_str() {
            held = true;
        } else if tracking.revoke_experiment(user, on).await? {
            changes.push(format!(
                "revoked {} on experiment {on} from MLflow user {user}",
                g.permission
            ));
        }
    }
    if !held
        && tracking
            .grant_experiment(user, experiment_id, Permission::Edit)
            .await?
    {
        changes.push(format!(
            "granted MLflow user {user} EDIT on experiment {experiment_id}"
        ));
    }
    Ok(changes)
}

/// Deletes the endpoint's MLflow user when the endpoint no longer needs it (deleted, tracking
/// off, or its own credential named) and the operator manages users. `Some(note)` when a user
/// was deleted. The Secret goes with the endpoint (owner reference); when the endpoint stays, it
/// is marked released (its password opens nothing any more).
pub async fn release(
    ep: &GatewayEndpoint,
    ctx: &Context,
    tracking: &MlflowClient,
    endpoint_deleted: bool,
) -> Result<Option<String>, Error> {
    if !endpoint_deleted && wants_own_user(ep) {
        return Ok(None);
    }
    let ns = ep.namespace().unwrap_or_default();
    let secret_name = render::credential_secret_name(ep);
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let secret = api.get_opt(&secret_name).await?;
    let per_endpoint_secret = secret.as_ref().filter(|s| {
        render::is_owned_by(&s.metadata, ep)
            && s.annotations().get(KIND_ANNOTATION).map(String::as_str) == Some(PER_ENDPOINT)
    });
    // Nothing to release unless a per-endpoint Secret says a user was made, or (on deletion) the
    // operator manages users at all: its Secret may have been deleted by hand.
    if per_endpoint_secret.is_none() && !endpoint_deleted {
        return Ok(None);
    }
    if ctx.settings.trace_credentials() == TraceCredentials::Mirrored
        && per_endpoint_secret.is_none()
    {
        return Ok(None);
    }
    let account = ctx.account.account(&ctx.tracking).await?;
    if !matches!(account, Account::Admin { .. }) {
        return Ok(None);
    }
    let uid = ep.uid().unwrap_or_default();
    let user = username(&ns, &ep.name_any(), &uid);
    let deleted = tracking.delete_user(&user).await?;
    ctx.credentials.forget(&uid);
    if !endpoint_deleted && per_endpoint_secret.is_some() {
        // The Secret stays until the endpoint goes (garbage collection; the operator needs no
        // delete verb), marked so that its user is not looked for again.
        let patch = serde_json::json!({"metadata": {"annotations": {KIND_ANNOTATION: RELEASED}}});
        api.patch(&secret_name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    Ok(deleted.then(|| format!("deleted MLflow user {user} (the endpoint's trace credential)")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(annotations: &str) -> GatewayEndpoint {
        serde_yaml::from_str(&format!(
            "apiVersion: mlflow-gateway.dev/v1alpha1\nkind: GatewayEndpoint\nmetadata: {{name: chat, namespace: team-a, uid: u1{annotations}}}\nspec:\n  models: [{{name: m, provider: openai, model: x}}]\n"
        ))
        .unwrap()
    }

    #[test]
    fn usernames_are_readable_and_fit_mlflow() {
        assert_eq!(
            username("team-a", "chat", "u1"),
            "gateway-endpoint/team-a/chat"
        );
        let long = "n".repeat(253);
        assert_eq!(username("team-a", &long, "u1"), "gateway-endpoint/u1");
        assert!(!username("a", "b", "c").contains(':'));
    }

    #[test]
    fn the_mode_follows_the_setting_and_the_account() {
        let admin = Account::Admin {
            username: "admin".into(),
        };
        assert_eq!(mode(TraceCredentials::Auto, &admin), Mode::PerEndpoint);
        assert!(matches!(
            mode(TraceCredentials::Mirrored, &admin),
            Mode::Mirrored { .. }
        ));
        let Mode::Mirrored { why } = mode(
            TraceCredentials::Auto,
            &Account::NotAdmin {
                username: "op".into(),
            },
        ) else {
            panic!("not mirrored")
        };
        assert!(why.contains("op is not an MLflow admin"), "{why}");
        let Mode::Mirrored { why } = mode(TraceCredentials::Auto, &Account::NoUsersApi) else {
            panic!("not mirrored")
        };
        assert!(why.contains("no users API"), "{why}");
    }

    #[test]
    fn a_password_is_reused_only_from_our_secret_for_the_same_rotation() {
        let ep = endpoint("");
        let user = "gateway-endpoint/team-a/chat";
        let ours = credential_secret(&ep, user, "password-0123456789", "");
        assert_eq!(
            ours.metadata.name.as_deref(),
            Some("chat-mlflow-credentials")
        );
        assert_eq!(
            reusable_password(&ep, &ours, user, "").as_deref(),
            Some("password-0123456789")
        );
        // A rotation asked for: a new password.
        assert_eq!(reusable_password(&ep, &ours, user, "2026-11-30"), None);
        // Another username (the endpoint renamed its user), a mirror, someone else's Secret.
        assert_eq!(
            reusable_password(&ep, &ours, "gateway-endpoint/x", ""),
            None
        );
        let mut mirror = ours.clone();
        mirror.metadata.annotations = None;
        assert_eq!(reusable_password(&ep, &mirror, user, ""), None);
        let mut foreign = ours.clone();
        foreign.metadata.owner_references = None;
        assert_eq!(reusable_password(&ep, &foreign, user, ""), None);
        // Made for the annotation's current value.
        let rotated = endpoint(", annotations: {mlflow-gateway.dev/rotate-credential: r2}");
        assert_eq!(rotate_value(&rotated), "r2");
        let s = credential_secret(&rotated, user, "password-abcdefghij", "r2");
        assert!(reusable_password(&rotated, &s, user, "r2").is_some());
    }

    #[test]
    fn the_digest_changes_with_the_password_and_hides_it() {
        let a = digest("u", "password-0123456789");
        assert_eq!(a.len(), 16);
        assert_ne!(a, digest("u", "password-0123456780"));
        assert!(!a.contains("password"));
    }

    #[test]
    fn the_memory_holds_for_the_same_user_experiment_and_password() {
        let memo = EnsuredCredentials::new(Duration::from_secs(60));
        let e = |exp: &str| Ensured {
            username: "u".into(),
            experiment_id: exp.into(),
            digest: "d".into(),
        };
        memo.record("uid", Some(e("1")));
        assert!(memo.recent("uid", &e("1")));
        assert!(
            !memo.recent("uid", &e("2")),
            "a new experiment is granted again"
        );
        memo.retain(&HashSet::new());
        assert!(!memo.recent("uid", &e("1")));
        let expired = EnsuredCredentials::new(Duration::ZERO);
        expired.record("uid", Some(e("1")));
        assert!(!expired.recent("uid", &e("1")));
    }
}
