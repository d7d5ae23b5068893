//! Development tools of mlflow-gateway-operator, one implementation each for the tests and the
//! demo (`make demo`):
//!
//! - [`fake_llm`]: local fakes of the LLM providers' APIs (OpenAI, Azure OpenAI, Anthropic,
//!   Gemini) on 127.0.0.1; the `fake-llm` command serves one.
//! - [`hostile_llm`]: a provider gone wrong (a huge answer, an endless event-stream line, silence
//!   after the first event), for the gateway's limits; the `hostile-llm` command serves one.
//! - [`declared`]: an endpoint's gateway as its Deployment declares it (container arguments and
//!   environment, Secret references resolved, the ConfigMap mounted), to run on this machine where
//!   the pods run no process (kwok); the `run-gateway` command runs one.
//!
//! A crate of its own, not part of the operator: nothing here ships, and the operator's library
//! stays free of test doubles.

pub mod declared;
pub mod fake_llm;
pub mod hostile_llm;
