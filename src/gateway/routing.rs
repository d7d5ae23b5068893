//! Which models one request tries, in order: one of the primary models, chosen at random in
//! proportion to its weight (a traffic split), then the fallbacks in their listed order, at most
//! `max_attempts` in all.
//!
//! MLflow composes this as providers wrapping providers (TrafficRouteProvider, FallbackProvider).
//! Here it is a plan of attempts that the invocation (`invoke`) walks, because every attempt is
//! traced and its failure classified there, and a stream commits to its model at its first
//! bytes; a plan is an iterator, so routing costs no allocation or dynamic call per request.

use serde_json::json;

use super::config::{ModelConfig, Operation, RoutingConfig};

/// The endpoint's routing, ready for requests.
#[derive(Debug)]
pub struct Routing {
    /// The primary pool, each model with its weight (all above 0).
    models: Vec<(ModelConfig, u64)>,
    total_weight: u64,
    fallbacks: Vec<ModelConfig>,
    max_attempts: usize,
}

impl Routing {
    pub fn new(config: RoutingConfig) -> Self {
        let models: Vec<(ModelConfig, u64)> = config
            .models
            .into_iter()
            .filter(|(_, w)| *w > 0)
            .map(|(m, w)| (m, u64::from(w)))
            .collect();
        Routing {
            total_weight: models.iter().map(|(_, w)| w).sum(),
            models,
            fallbacks: config.fallbacks,
            max_attempts: config.max_attempts,
        }
    }

    /// The attempts of one request: a weighted choice among the models, then the fallbacks in
    /// order, at most `max_attempts`. The choice is made here, once: clones of the iterator
    /// repeat it.
    pub fn attempts(&self) -> impl Iterator<Item = &ModelConfig> + Clone {
        self.attempts_without(0)
    }

    /// [`Self::attempts`] with the primary models of the bit set `left_out` (bit i: the i-th
    /// model) out of the choice: a model that cannot take the request as the client sent it (a
    /// field its provider refuses) leaves the choice to the others of the split, so the same
    /// request does not succeed or fail by the draw.
    pub fn attempts_without(&self, left_out: u64) -> impl Iterator<Item = &ModelConfig> + Clone {
        self.pick(left_out)
            .into_iter()
            .chain(self.fallbacks.iter())
            .take(self.max_attempts)
    }

    /// The bit of `model` for [`Self::attempts_without`], if it is a primary model.
    pub fn primary_bit(&self, model: &ModelConfig) -> Option<u64> {
        self.models
            .iter()
            .position(|(m, _)| std::ptr::eq(m, model))
            .filter(|i| *i < 64)
            .map(|i| 1 << i)
    }

    /// Why no model could take a request of `op`, if none can: each builds a minimal request
    /// (a key that is no header value, an unusable URL fail here).
    pub fn unservable(&self, op: Operation) -> Option<String> {
        let probe = match op {
            Operation::Chat => json!({"messages": [{"role": "user", "content": "ping"}]}),
            Operation::Completions => json!({"prompt": "ping"}),
            Operation::Embeddings => json!({"input": "ping"}),
        };
        let mut why = Vec::new();
        for m in self.models.iter().map(|(m, _)| m).chain(&self.fallbacks) {
            match m.build_request(op, &probe) {
                Ok(_) => return None,
                Err(e) => why.push(e.to_string()),
            }
        }
        Some(format!("no model can serve a request: {}", why.join("; ")))
    }

    fn pick(&self, left_out: u64) -> Option<&ModelConfig> {
        let total = if left_out == 0 {
            self.total_weight
        } else {
            self.candidates(left_out).map(|(_, w)| w).sum()
        };
        if total == 0 {
            return None;
        }
        let mut pick = fastrand::u64(0..total);
        for (model, w) in self.candidates(left_out) {
            if pick < w {
                return Some(model);
            }
            pick -= w;
        }
        None
    }

    fn candidates(&self, left_out: u64) -> impl Iterator<Item = (&ModelConfig, u64)> {
        self.models
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i >= 64 || left_out & (1 << i) == 0)
            .map(|(_, (m, w))| (m, *w))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gateway::config::{ModelSettings, Provider};

    fn model(name: &str) -> ModelConfig {
        let settings = ModelSettings {
            name: name.into(),
            provider: Provider::Ollama,
            model: "m".into(),
            api_base: None,
            api_version: None,
            deployment: None,
        };
        ModelConfig::new(&settings, None).unwrap()
    }

    fn names<'a>(attempts: impl Iterator<Item = &'a ModelConfig>) -> Vec<&'a str> {
        attempts.map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn one_primary_model_then_the_fallbacks_in_order_up_to_max_attempts() {
        let routing = Routing::new(RoutingConfig {
            models: vec![(model("a"), 1)],
            fallbacks: vec![model("f1"), model("f2")],
            max_attempts: 3,
        });
        assert_eq!(names(routing.attempts()), ["a", "f1", "f2"]);
        let routing = Routing::new(RoutingConfig {
            max_attempts: 2,
            ..RoutingConfig {
                models: vec![(model("a"), 1)],
                fallbacks: vec![model("f1"), model("f2")],
                max_attempts: 0,
            }
        });
        assert_eq!(names(routing.attempts()), ["a", "f1"]);
    }

    #[test]
    fn routing_without_a_model_that_can_build_a_request_says_why() {
        let routing = Routing::new(RoutingConfig {
            models: vec![(model("a"), 1)],
            fallbacks: vec![],
            max_attempts: 1,
        });
        assert_eq!(routing.unservable(Operation::Chat), None);
        let mut settings = ModelSettings {
            name: "claude".into(),
            provider: Provider::Anthropic,
            model: "m".into(),
            api_base: None,
            api_version: None,
            deployment: None,
        };
        let claude = ModelConfig::new(&settings, Some("k".into())).unwrap();
        settings.name = "claude-2".into();
        let claude2 = ModelConfig::new(&settings, Some("k".into())).unwrap();
        let routing = Routing::new(RoutingConfig {
            models: vec![(claude, 1)],
            fallbacks: vec![claude2],
            max_attempts: 2,
        });
        let why = routing.unservable(Operation::Embeddings).unwrap();
        assert!(why.contains("claude") && why.contains("claude-2"), "{why}");
    }

    #[test]
    fn models_left_out_of_the_split_are_never_picked() {
        let routing = Routing::new(RoutingConfig {
            models: vec![(model("a"), 1), (model("b"), 1), (model("c"), 1)],
            fallbacks: vec![model("f")],
            max_attempts: 2,
        });
        let a = routing.primary_bit(&routing.models[0].0).unwrap();
        let c = routing.primary_bit(&routing.models[2].0).unwrap();
        assert!(routing.primary_bit(&routing.fallbacks[0]).is_none());
        for _ in 0..200 {
            assert_eq!(names(routing.attempts_without(a | c)), ["b", "f"]);
        }
        assert_eq!(names(routing.attempts_without(0b111)), ["f"]);
    }

    #[test]
    fn traffic_splits_by_weight_and_weight_zero_gets_none() {
        let routing = Routing::new(RoutingConfig {
            models: vec![(model("a"), 3), (model("b"), 1), (model("off"), 0)],
            fallbacks: vec![],
            max_attempts: 1,
        });
        let mut a = 0;
        for _ in 0..4000 {
            let attempts = routing.attempts();
            let first = names(attempts.clone());
            assert_eq!(first, names(attempts), "a clone repeats the choice");
            match first[0] {
                "a" => a += 1,
                "b" => {}
                other => panic!("{other} has weight 0"),
            }
        }
        assert!((2700..3300).contains(&a), "{a} of 4000 to weight 3 of 4");
    }
}
