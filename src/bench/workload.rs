//! Synthetic workloads: the prompts a benchmark sends and their output lengths, generated
//! deterministically from a seed.
//!
//! Text is built from 4-byte units (three letters and a space), so with the sim backend's
//! approximate tokeniser (4 bytes per token) a prompt of N "tokens" is exactly N tokens and
//! shared text is shared at token (and KV-block) granularity. Each group, conversation or
//! repository starts with a unique 8-byte tag and each request's own text with another, so two
//! prompts share the text they are meant to share plus at most part of one tag (under two
//! tokens; far below a KV block or a prefix-index block, so no cache can hit on it).

use std::fmt::Write as _;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Most requests one workload may plan.
pub const MAX_REQUESTS: u64 = 200_000;
/// Most tokens of one prompt (above every sim profile's context length).
pub const MAX_PROMPT_TOKENS: u64 = 131_072;
/// Most prompt bytes one workload may hold in memory.
pub const MAX_TOTAL_PROMPT_BYTES: u64 = 1 << 30;

/// A workload and its shape parameters (all token counts at ~4 bytes per token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Workload {
    /// The reference prefix-cache benchmark: `groups` system prompts, each shared by
    /// `prompts_per_group` requests with their own question; requests in random order.
    SharedPrefix {
        groups: u32,
        prompts_per_group: u32,
        system_tokens: u32,
        question_tokens: u32,
        output_tokens: u32,
    },
    /// Short unique chats (no shared text), lengths uniform in `[prompt_tokens_min,
    /// prompt_tokens_max]`; pair with a bursty rate.
    BurstyChat {
        requests: u32,
        prompt_tokens_min: u32,
        prompt_tokens_max: u32,
        output_tokens: u32,
    },
    /// `conversations` chats of `turns` turns; turn t's prompt is turn t-1's prompt plus a
    /// stand-in for the previous answer (`output_tokens`) plus a new user message. Turns are
    /// sent in rounds (all first turns, then all second turns, ...), each round shuffled.
    MultiTurn {
        conversations: u32,
        turns: u32,
        user_tokens: u32,
        output_tokens: u32,
    },
    /// A coding agent: `repos` large repository contexts, each request one of them (uniformly)
    /// plus a small edit instruction.
    CodingAgent {
        repos: u32,
        repo_tokens: u32,
        requests: u32,
        edit_tokens: u32,
        output_tokens: u32,
    },
    /// Interactive traffic (objective [`INTERACTIVE_OBJECTIVE`], priority
    /// [`INTERACTIVE_PRIORITY`]) at a steady `interactive_rate` under sheddable batch traffic
    /// (objective [`BATCH_OBJECTIVE`], priority [`BATCH_PRIORITY`]) that arrives in bursts
    /// over capacity (the run's rate shape), as an async processor would send it. Unique
    /// prompts, lengths uniform in `[prompt_tokens_min, prompt_tokens_max]`.
    MixedPriority {
        interactive_requests: u32,
        interactive_rate: f64,
        batch_requests: u32,
        prompt_tokens_min: u32,
        prompt_tokens_max: u32,
        output_tokens: u32,
    },
}

/// Objective names and priorities of the mixed-priority workload (the EPP's pool file maps the
/// names to the priorities).
pub const INTERACTIVE_OBJECTIVE: &str = "interactive";
pub const INTERACTIVE_PRIORITY: i32 = 1;
pub const BATCH_OBJECTIVE: &str = "batch";
pub const BATCH_PRIORITY: i32 = -1;

/// The same classes as vLLM request `priority` values (lower is served first), sent in the body
/// when the replicas run `--scheduling-policy priority`, as an async processor would mark its
/// batch work.
pub const INTERACTIVE_ENGINE_PRIORITY: i64 = 0;
pub const BATCH_ENGINE_PRIORITY: i64 = 1;

/// The body `priority` for a request of `objective` (none for requests without one).
pub fn engine_priority(objective: Option<&str>) -> Option<i64> {
    match objective? {
        INTERACTIVE_OBJECTIVE => Some(INTERACTIVE_ENGINE_PRIORITY),
        BATCH_OBJECTIVE => Some(BATCH_ENGINE_PRIORITY),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkloadError {
    #[error("{field} must be at least {min}, got {value}")]
    TooSmall {
        field: &'static str,
        min: u64,
        value: u64,
    },
    #[error("{what} would be {value}, above the cap of {max}")]
    TooLarge {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("interactive_rate must be finite and > 0, got {0}")]
    BadRate(String),
}

/// One planned request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRequest {
    pub prompt: String,
    pub max_tokens: u32,
    /// Group, conversation or repository the prompt belongs to (its own index when unique).
    pub group: u32,
    /// `x-gateway-inference-objective` (mixed-priority workload only).
    pub objective: Option<&'static str>,
}

fn at_least(field: &'static str, value: u32, min: u32) -> Result<(), WorkloadError> {
    if value < min {
        return Err(WorkloadError::TooSmall {
            field,
            min: u64::from(min),
            value: u64::from(value),
        });
    }
    Ok(())
}

fn at_most(what: &'static str, value: u64, max: u64) -> Result<(), WorkloadError> {
    if value > max {
        return Err(WorkloadError::TooLarge { what, value, max });
    }
    Ok(())
}

impl Workload {
    pub fn name(&self) -> &'static str {
        match self {
            Workload::SharedPrefix { .. } => "shared-prefix",
            Workload::BurstyChat { .. } => "bursty-chat",
            Workload::MultiTurn { .. } => "multi-turn",
            Workload::CodingAgent { .. } => "coding-agent",
            Workload::MixedPriority { .. } => "mixed-priority",
        }
    }

    /// Checks sizes against the caps, before anything is allocated.
    pub fn validate(&self) -> Result<(), WorkloadError> {
        let (requests, max_prompt) = match *self {
            Workload::SharedPrefix {
                groups,
                prompts_per_group,
                system_tokens,
                question_tokens,
                output_tokens,
            } => {
                at_least("groups", groups, 1)?;
                at_least("prompts_per_group", prompts_per_group, 1)?;
                at_least("system_tokens", system_tokens, 2)?;
                at_least("question_tokens", question_tokens, 2)?;
                at_least("output_tokens", output_tokens, 1)?;
                (
                    u64::from(groups) * u64::from(prompts_per_group),
                    u64::from(system_tokens) + u64::from(question_tokens),
                )
            }
            Workload::BurstyChat {
                requests,
                prompt_tokens_min,
                prompt_tokens_max,
                output_tokens,
            } => {
                at_least("requests", requests, 1)?;
                at_least("prompt_tokens_min", prompt_tokens_min, 2)?;
                at_least("prompt_tokens_max", prompt_tokens_max, prompt_tokens_min)?;
                at_least("output_tokens", output_tokens, 1)?;
                (u64::from(requests), u64::from(prompt_tokens_max))
            }
            Workload::MultiTurn {
                conversations,
                turns,
                user_tokens,
                output_tokens,
            } => {
                at_least("conversations", conversations, 1)?;
                at_least("turns", turns, 1)?;
                at_least("user_tokens", user_tokens, 2)?;
                at_least("output_tokens", output_tokens, 1)?;
                (
                    u64::from(conversations) * u64::from(turns),
                    2 + u64::from(turns) * (u64::from(user_tokens) + u64::from(output_tokens)),
                )
            }
            Workload::CodingAgent {
                repos,
                repo_tokens,
                requests,
                edit_tokens,
                output_tokens,
            } => {
                at_least("repos", repos, 1)?;
                at_least("repo_tokens", repo_tokens, 2)?;
                at_least("requests", requests, 1)?;
                at_least("edit_tokens", edit_tokens, 2)?;
                at_least("output_tokens", output_tokens, 1)?;
                (
                    u64::from(requests),
                    u64::from(repo_tokens) + u64::from(edit_tokens),
                )
            }
            Workload::MixedPriority {
                interactive_requests,
                interactive_rate,
                batch_requests,
                prompt_tokens_min,
                prompt_tokens_max,
                output_tokens,
            } => {
                at_least("interactive_requests", interactive_requests, 1)?;
                at_least("prompt_tokens_min", prompt_tokens_min, 2)?;
                at_least("prompt_tokens_max", prompt_tokens_max, prompt_tokens_min)?;
                at_least("output_tokens", output_tokens, 1)?;
                if !(interactive_rate.is_finite() && interactive_rate > 0.0) {
                    return Err(WorkloadError::BadRate(interactive_rate.to_string()));
                }
                (
                    u64::from(interactive_requests) + u64::from(batch_requests),
                    u64::from(prompt_tokens_max),
                )
            }
        };
        at_most("the request count", requests, MAX_REQUESTS)?;
        at_most("the longest prompt (tokens)", max_prompt, MAX_PROMPT_TOKENS)?;
        at_most(
            "the total prompt size (bytes)",
            requests.saturating_mul(max_prompt).saturating_mul(4),
            MAX_TOTAL_PROMPT_BYTES,
        )?;
        Ok(())
    }

    /// Every request of the workload, in sending order.
    pub fn plan(&self, seed: u64) -> Result<Vec<PlannedRequest>, WorkloadError> {
        self.validate()?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Vec::new();
        match *self {
            Workload::SharedPrefix {
                groups,
                prompts_per_group,
                system_tokens,
                question_tokens,
                output_tokens,
            } => {
                let systems: Vec<String> = (0..groups)
                    .map(|g| tagged('S', g, system_tokens, &mut rng))
                    .collect();
                let mut order: Vec<(u32, u32)> = (0..groups)
                    .flat_map(|g| (0..prompts_per_group).map(move |p| (g, p)))
                    .collect();
                order.shuffle(&mut rng);
                for (i, (g, _)) in order.into_iter().enumerate() {
                    let system = systems.get(g as usize).map_or("", String::as_str);
                    let mut prompt = String::with_capacity(
                        (system_tokens as usize + question_tokens as usize) * 4,
                    );
                    prompt.push_str(system);
                    prompt.push_str(&tagged('Q', i as u32, question_tokens, &mut rng));
                    out.push(PlannedRequest {
                        prompt,
                        max_tokens: output_tokens,
                        group: g,
                        objective: None,
                    });
                }
            }
            Workload::BurstyChat {
                requests,
                prompt_tokens_min,
                prompt_tokens_max,
                output_tokens,
            } => {
                for i in 0..requests {
                    let len = rng.random_range(prompt_tokens_min..=prompt_tokens_max);
                    out.push(PlannedRequest {
                        prompt: tagged('U', i, len, &mut rng),
                        max_tokens: output_tokens,
                        group: i,
                        objective: None,
                    });
                }
            }
            Workload::MultiTurn {
                conversations,
                turns,
                user_tokens,
                output_tokens,
            } => {
                let mut convs: Vec<String> = (0..conversations)
                    .map(|c| tagged('C', c, 2, &mut rng))
                    .collect();
                let mut order: Vec<usize> = (0..convs.len()).collect();
                for t in 0..turns {
                    // Each round in a fresh random order: a fixed order would let Envoy's round
                    // robin land every turn of a conversation on the same replica whenever the
                    // conversation count is a multiple of the replica count.
                    order.shuffle(&mut rng);
                    for &c in &order {
                        let Some(conv) = convs.get_mut(c) else {
                            continue;
                        };
                        if t > 0 {
                            // Stand-in for the previous answer, which the client would append.
                            conv.push_str(&tagged('A', t, output_tokens, &mut rng));
                        }
                        conv.push_str(&tagged('T', t, user_tokens, &mut rng));
                        out.push(PlannedRequest {
                            prompt: conv.clone(),
                            max_tokens: output_tokens,
                            group: c as u32,
                            objective: None,
                        });
                    }
                }
            }
            Workload::CodingAgent {
                repos,
                repo_tokens,
                requests,
                edit_tokens,
                output_tokens,
            } => {
                let contexts: Vec<String> = (0..repos)
                    .map(|r| tagged('R', r, repo_tokens, &mut rng))
                    .collect();
                for i in 0..requests {
                    let r = rng.random_range(0..repos);
                    let mut prompt = contexts.get(r as usize).cloned().unwrap_or_default();
                    prompt.push_str(&tagged('E', i, edit_tokens, &mut rng));
                    out.push(PlannedRequest {
                        prompt,
                        max_tokens: output_tokens,
                        group: r,
                        objective: None,
                    });
                }
            }
            Workload::MixedPriority {
                interactive_requests,
                batch_requests,
                prompt_tokens_min,
                prompt_tokens_max,
                output_tokens,
                ..
            } => {
                // Interactive requests first, then batch: `Resolved::schedule` gives each
                // class its own arrival process and merges them by time.
                let classes = [
                    (interactive_requests, INTERACTIVE_OBJECTIVE, 'I'),
                    (batch_requests, BATCH_OBJECTIVE, 'B'),
                ];
                for (count, objective, tag) in classes {
                    for i in 0..count {
                        let len = rng.random_range(prompt_tokens_min..=prompt_tokens_max);
                        out.push(PlannedRequest {
                            prompt: tagged(tag, i, len, &mut rng),
                            max_tokens: output_tokens,
                            group: i,
                            objective: Some(objective),
                        });
                    }
                }
            }
        }
        Ok(out)
    }
}

/// `tokens` 4-byte units: an 8-byte tag (`kind` letter, 6-digit id, space) then random
/// three-letter words. Uppercase tags never occur in the lowercase filler, so text with
/// different tags diverges at its first byte.
fn tagged(kind: char, id: u32, tokens: u32, rng: &mut StdRng) -> String {
    let mut s = String::with_capacity(tokens as usize * 4);
    let _ = write!(s, "{kind}{:06} ", id % 1_000_000);
    for _ in 2..tokens {
        for _ in 0..3 {
            s.push(char::from(b'a' + rng.random_range(0..26u8)));
        }
        s.push(' ');
    }
    s
}

/// The JSON body of a streaming `/v1/completions` request.
pub fn completion_body(model: &str, prompt: &str, max_tokens: u32) -> Bytes {
    completion_body_with_priority(model, prompt, max_tokens, None)
}

/// [`completion_body`] with vLLM's `priority` field when `priority` is given.
pub fn completion_body_with_priority(
    model: &str,
    prompt: &str,
    max_tokens: u32,
    priority: Option<i64>,
) -> Bytes {
    let mut body = serde_json::json!({
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "ignore_eos": true,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    if let Some(p) = priority {
        body["priority"] = p.into();
    }
    Bytes::from(body.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn common_prefix(a: &str, b: &str) -> usize {
        a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()
    }

    #[test]
    fn shared_prefix_shares_exactly_the_system_prompt() {
        let w = Workload::SharedPrefix {
            groups: 6,
            prompts_per_group: 4,
            system_tokens: 100,
            question_tokens: 20,
            output_tokens: 8,
        };
        let plan = w.plan(1).unwrap();
        assert_eq!(plan.len(), 24);
        for g in 0..6 {
            assert_eq!(plan.iter().filter(|r| r.group == g).count(), 4);
        }
        for (i, a) in plan.iter().enumerate() {
            assert_eq!(a.prompt.len(), 120 * 4);
            assert_eq!(a.max_tokens, 8);
            for b in &plan[i + 1..] {
                let shared = common_prefix(&a.prompt, &b.prompt);
                if a.group == b.group {
                    assert!(
                        (400..408).contains(&shared),
                        "system prompt + part of a tag"
                    );
                    assert_eq!(&a.prompt[..400], &b.prompt[..400]);
                } else {
                    assert!(shared < 8, "different groups share part of a tag at most");
                }
            }
        }
        // Random order, not group by group.
        assert!(plan.windows(2).any(|w| w[0].group != w[1].group));
        assert_eq!(plan, w.plan(1).unwrap());
    }

    #[test]
    fn bursty_chat_shares_nothing() {
        let w = Workload::BurstyChat {
            requests: 50,
            prompt_tokens_min: 10,
            prompt_tokens_max: 30,
            output_tokens: 5,
        };
        let plan = w.plan(2).unwrap();
        assert_eq!(plan.len(), 50);
        for (i, a) in plan.iter().enumerate() {
            assert!((40..=120).contains(&a.prompt.len()));
            assert_eq!(a.prompt.len() % 4, 0);
            for b in &plan[i + 1..] {
                assert!(
                    common_prefix(&a.prompt, &b.prompt) < 8,
                    "part of the tag at most"
                );
            }
        }
    }

    #[test]
    fn multi_turn_extends_the_previous_turn() {
        let w = Workload::MultiTurn {
            conversations: 3,
            turns: 4,
            user_tokens: 10,
            output_tokens: 5,
        };
        let plan = w.plan(3).unwrap();
        assert_eq!(plan.len(), 12);
        for c in 0..3u32 {
            let turns: Vec<&PlannedRequest> = plan.iter().filter(|r| r.group == c).collect();
            assert_eq!(turns.len(), 4);
            for (t, pair) in turns.windows(2).enumerate() {
                assert!(pair[1].prompt.starts_with(&pair[0].prompt));
                // Tag (2) + turns × user 10 + (turns - 1) × answer 5, in tokens.
                let expect = 4 * (2 + 10 * (t + 2) + 5 * (t + 1));
                assert_eq!(pair[1].prompt.len(), expect);
            }
        }
        // Rounds: the first three requests are the three first turns, in some order.
        let mut first: Vec<u32> = plan.iter().take(3).map(|r| r.group).collect();
        first.sort_unstable();
        assert_eq!(first, [0, 1, 2]);
        assert!(plan.iter().take(3).all(|r| r.prompt.len() == 4 * 12));
    }

    #[test]
    fn coding_agent_shares_the_repository_context() {
        let w = Workload::CodingAgent {
            repos: 2,
            repo_tokens: 200,
            requests: 20,
            edit_tokens: 10,
            output_tokens: 4,
        };
        let plan = w.plan(4).unwrap();
        assert_eq!(plan.len(), 20);
        for (i, a) in plan.iter().enumerate() {
            for b in &plan[i + 1..] {
                let shared = common_prefix(&a.prompt, &b.prompt);
                if a.group == b.group {
                    assert!((800..808).contains(&shared));
                } else {
                    assert!(shared < 8);
                }
            }
        }
    }

    #[test]
    fn caps_and_minimums() {
        let w = Workload::SharedPrefix {
            groups: 1000,
            prompts_per_group: 1000,
            system_tokens: 10,
            question_tokens: 10,
            output_tokens: 1,
        };
        assert!(matches!(
            w.validate(),
            Err(WorkloadError::TooLarge {
                max: MAX_REQUESTS,
                ..
            })
        ));
        let w = Workload::BurstyChat {
            requests: 1,
            prompt_tokens_min: 10,
            prompt_tokens_max: 5,
            output_tokens: 1,
        };
        assert!(matches!(
            w.validate(),
            Err(WorkloadError::TooSmall {
                field: "prompt_tokens_max",
                ..
            })
        ));
    }

    #[test]
    fn yaml_round_trip_rejects_unknown_keys() {
        let w: Workload = serde_yaml::from_str(
            "kind: shared-prefix\ngroups: 2\nprompts_per_group: 3\nsystem_tokens: 10\nquestion_tokens: 4\noutput_tokens: 2\n",
        )
        .unwrap();
        assert_eq!(w.name(), "shared-prefix");
        assert!(serde_yaml::from_str::<Workload>(
            "kind: bursty-chat\nrequests: 2\nprompt_tokens_min: 2\nprompt_tokens_max: 3\noutput_tokens: 1\nbogus: 1\n"
        )
        .is_err());
    }

    #[test]
    fn completion_body_is_a_streaming_request() {
        let b = completion_body("m", "hi", 3);
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["stream"], true);
        assert_eq!(v["max_tokens"], 3);
        assert_eq!(v["prompt"], "hi");
        assert!(v.get("priority").is_none());
        let b = completion_body_with_priority("m", "hi", 3, engine_priority(Some(BATCH_OBJECTIVE)));
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["priority"], 1);
        assert_eq!(engine_priority(Some(INTERACTIVE_OBJECTIVE)), Some(0));
        assert_eq!(engine_priority(None), None);
    }

    #[test]
    fn mixed_priority_plans_both_classes_with_their_objectives() {
        let w = Workload::MixedPriority {
            interactive_requests: 3,
            interactive_rate: 1.0,
            batch_requests: 5,
            prompt_tokens_min: 10,
            prompt_tokens_max: 20,
            output_tokens: 4,
        };
        let plan = w.plan(1).unwrap();
        let objectives: Vec<Option<&str>> = plan.iter().map(|r| r.objective).collect();
        let i = Some(INTERACTIVE_OBJECTIVE);
        let b = Some(BATCH_OBJECTIVE);
        assert_eq!(objectives, [i, i, i, b, b, b, b, b]);
        assert!(plan.iter().all(|r| (40..=80).contains(&r.prompt.len())));
        assert_eq!(w.name(), "mixed-priority");
        let bad = Workload::MixedPriority {
            interactive_requests: 3,
            interactive_rate: 0.0,
            batch_requests: 5,
            prompt_tokens_min: 10,
            prompt_tokens_max: 20,
            output_tokens: 4,
        };
        assert_eq!(bad.validate(), Err(WorkloadError::BadRate("0".into())));
    }
}
