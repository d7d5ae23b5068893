//! The integration tests: one test binary, one module per area, all sharing [`support`] (the real
//! Kubernetes control plane, the real MLflow servers, the operator and gateway processes).
//!
//! One binary rather than one per file: `support` is compiled and linked once, and the cluster and
//! the MLflow server a binary starts for itself (when `make test` passes none in) are started once.
//! Run one area with `cargo test --test integration gateway::`, one test by its name.
//!
//! Which areas need which outside service: `crd` and `gateway_limits` need none; `smoke`, `e2e_*`, `helm`,
//! `leader_election` and `gitops` need the cluster (most of them MLflow too, `gitops` also Go for
//! Argo CD's Lua runtime); `mlflow_client`, `telemetry_mlflow` and `gateway` need MLflow (`tenancy` needs
//! both), except
//! the tests the Makefile's `UNIT_TESTS` lists, which `make unit` runs with none. `real_node` needs
//! the cluster's real node (root; `support::real_node` starts it when the cluster has none).
//! The fake LLM providers the gateway tests use are `mgo_dev::fake_llm` (tools/dev), tested there.

mod support;

mod admission_policy;
mod callers;
mod crd;
mod e2e_admission;
mod e2e_credential;
mod e2e_experiment;
mod e2e_pods;
mod e2e_validation;
mod e2e_workspace_auth;
mod gateway;
mod gateway_limits;
mod gitops;
mod helm;
mod leader_election;
mod mlflow_client;
mod mlflow_users;
mod rbac;
mod real_node;
mod smoke;
mod telemetry_mlflow;
mod tenancy;
