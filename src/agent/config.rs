//! `switchyard agent` flags (each also from the environment variable the code-agent chart sets)
//! and their validation into an [`AgentConfig`].

use std::time::Duration;

use super::claim::ClaimConfig;
use super::gateway::GatewayConfig;
use super::runner::{AgentConfig, DEFAULT_SYSTEM_PROMPT};
use super::session::SandboxSource;

fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text).map_err(|e| format!("`{text}`: {e}"))?;
    if d.is_zero() {
        return Err("a timeout must be above zero".into());
    }
    Ok(d)
}

/// Flags shared by `agent serve` and `agent run`.
#[derive(Debug, Clone, clap::Args)]
pub struct AgentOptions {
    /// Models in fallback order, comma-separated: on 429/5xx/timeout/connection error, or a
    /// malformed tool call after --malformed-retries retries, the next one is tried.
    #[arg(
        long = "model",
        env = "INFERENCE_MODEL",
        value_delimiter = ',',
        required = true
    )]
    pub models: Vec<String>,
    /// OpenAI-compatible base URL of the gateway (`/v1/chat/completions` is appended); plain
    /// http (the gateway's in-cluster address).
    #[arg(long, env = "INFERENCE_GATEWAY_URL")]
    pub gateway_url: Option<String>,
    /// Without --gateway-url: the Gateway (in --namespace) whose `status.addresses[0]` is used,
    /// read at startup (waits up to --claim-timeout for an address).
    #[arg(long, env = "INFERENCE_GATEWAY_NAME")]
    pub gateway_name: Option<String>,
    /// A sandbox runtime you started yourself (`switchyard sandbox`), shared by all tasks.
    /// Without it, each task claims a sandbox from --warm-pool through --sandbox-router-url.
    #[arg(long, env = "SANDBOX_URL")]
    pub sandbox_url: Option<String>,
    /// The agent-sandbox router (`X-Sandbox-*` headers pick the sandbox).
    #[arg(long, env = "SANDBOX_ROUTER_URL")]
    pub sandbox_router_url: Option<String>,
    /// SandboxWarmPool each task's SandboxClaim names (`spec.warmPoolRef`); default
    /// `<--sandbox-template>-pool`, the chart's naming.
    #[arg(long, env = "SANDBOX_WARM_POOL")]
    pub warm_pool: Option<String>,
    /// SandboxTemplate of the warm pool (only used to derive the default --warm-pool).
    #[arg(long, env = "SANDBOX_TEMPLATE")]
    pub sandbox_template: Option<String>,
    /// Namespace of the claims.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The runtime's port in the sandbox pod (`X-Sandbox-Port`).
    #[arg(long, default_value_t = 8888)]
    pub sandbox_port: u16,
    /// How long a claim may take to be bound to a Ready sandbox.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub claim_timeout: Duration,
    /// Timeout of each model request (a timeout falls back to the next model).
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub request_timeout: Duration,
    /// Timeout of each sandbox request (commands have the runtime's own limit too).
    #[arg(long, default_value = "330s", value_parser = parse_duration)]
    pub sandbox_timeout: Duration,
    /// Model steps (chat completions that returned a usable reply) per task.
    #[arg(long, default_value_t = 16)]
    pub max_steps: u32,
    /// Largest `max_steps` a task request may ask for.
    #[arg(long, default_value_t = 64)]
    pub max_steps_limit: u32,
    /// Times a model is asked again after a malformed tool call before the next model is tried.
    #[arg(long, default_value_t = 2)]
    pub malformed_retries: u32,
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// `max_tokens` of each request (default: the server's).
    #[arg(long)]
    pub max_tokens: Option<u32>,
    /// Replaces the built-in system prompt.
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Log format: `console` or `json`.
    #[arg(long, default_value = "console")]
    pub log_format: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag}: {reason}")]
    Invalid { flag: &'static str, reason: String },
    #[error("Kubernetes client (SandboxClaims, Gateway address): {0}")]
    Kube(String),
    #[error("--gateway-name: {0}")]
    Gateway(#[from] super::discovery::DiscoveryError),
}

fn invalid(flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        flag,
        reason: reason.into(),
    }
}

fn check_url(flag: &'static str, url: &str) -> Result<String, ConfigError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| invalid(flag, format!("`{url}` is not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(invalid(
            flag,
            format!("`{url}`: expected http://HOST[:PORT][/PATH]"),
        ));
    }
    Ok(url.trim_end_matches('/').to_string())
}

/// What the sandbox flags ask for, before any Kubernetes client exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SandboxPlan {
    Direct {
        url: String,
    },
    Claim {
        router_url: String,
        warm_pool: String,
    },
}

impl AgentOptions {
    pub fn sandbox_plan(&self) -> Result<SandboxPlan, ConfigError> {
        if let Some(url) = &self.sandbox_url {
            return Ok(SandboxPlan::Direct {
                url: check_url("--sandbox-url", url)?,
            });
        }
        let router = self.sandbox_router_url.as_deref().ok_or_else(|| {
            invalid(
                "--sandbox-url",
                "give --sandbox-url, or --sandbox-router-url with --warm-pool to claim sandboxes",
            )
        })?;
        let warm_pool = match (&self.warm_pool, &self.sandbox_template) {
            (Some(pool), _) if !pool.is_empty() => pool.clone(),
            (_, Some(template)) if !template.is_empty() => format!("{template}-pool"),
            _ => {
                return Err(invalid(
                    "--warm-pool",
                    "claiming sandboxes needs --warm-pool (or --sandbox-template)",
                ))
            }
        };
        Ok(SandboxPlan::Claim {
            router_url: check_url("--sandbox-router-url", router)?,
            warm_pool,
        })
    }

    /// Validates everything but the sandbox source.
    pub fn check(&self) -> Result<(), ConfigError> {
        let models: Vec<&String> = self
            .models
            .iter()
            .filter(|m| !m.trim().is_empty())
            .collect();
        if models.is_empty() {
            return Err(invalid("--model", "at least one model is needed"));
        }
        if self.max_steps == 0 || self.max_steps > self.max_steps_limit {
            return Err(invalid(
                "--max-steps",
                format!(
                    "must be between 1 and --max-steps-limit ({})",
                    self.max_steps_limit
                ),
            ));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(invalid("--temperature", "must be between 0 and 2"));
        }
        match (&self.gateway_url, &self.gateway_name) {
            (Some(url), _) => check_url("--gateway-url", url).map(|_| ()),
            (None, Some(name)) if !name.is_empty() => Ok(()),
            _ => Err(invalid(
                "--gateway-url",
                "the gateway's URL is needed (INFERENCE_GATEWAY_URL, or INFERENCE_GATEWAY_NAME to read it from the Gateway's status)",
            )),
        }
    }

    /// The full configuration; `kube` is called only when sandboxes are claimed.
    pub async fn build<F, Fut>(&self, kube: F) -> Result<AgentConfig, ConfigError>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<kube::Client, String>>,
    {
        self.check()?;
        let plan = self.sandbox_plan()?;
        let discover = self.gateway_url.is_none();
        let client = if discover || matches!(plan, SandboxPlan::Claim { .. }) {
            Some(kube().await.map_err(ConfigError::Kube)?)
        } else {
            None
        };
        let gateway_url = match (&self.gateway_url, &self.gateway_name, &client) {
            (Some(url), _, _) => check_url("--gateway-url", url)?,
            (None, Some(name), Some(client)) => {
                super::discovery::gateway_url(
                    client.clone(),
                    &self.namespace,
                    name,
                    self.claim_timeout,
                    Duration::from_secs(1),
                )
                .await?
            }
            _ => return Err(invalid("--gateway-url", "missing")),
        };
        let sandbox = match (plan, client) {
            (SandboxPlan::Direct { url }, _) => SandboxSource::Direct { url },
            (
                SandboxPlan::Claim {
                    router_url,
                    warm_pool,
                },
                Some(client),
            ) => SandboxSource::Claim {
                client,
                router_url,
                claim: ClaimConfig {
                    namespace: self.namespace.clone(),
                    warm_pool,
                    ready_timeout: self.claim_timeout,
                    poll_interval: Duration::from_millis(500),
                },
                port: self.sandbox_port,
            },
            (SandboxPlan::Claim { .. }, None) => return Err(ConfigError::Kube("no client".into())),
        };
        Ok(AgentConfig {
            models: self
                .models
                .iter()
                .map(|m| m.trim().to_string())
                .filter(|m| !m.is_empty())
                .collect(),
            gateway: GatewayConfig {
                url: gateway_url,
                timeout: self.request_timeout,
                temperature: self.temperature,
                max_tokens: self.max_tokens,
            },
            sandbox,
            sandbox_timeout: self.sandbox_timeout,
            max_steps: self.max_steps,
            max_steps_limit: self.max_steps_limit,
            malformed_retries: self.malformed_retries,
            system_prompt: self
                .system_prompt
                .clone()
                .unwrap_or_else(|| DEFAULT_SYSTEM_PROMPT.to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        opts: AgentOptions,
    }

    fn opts(args: &[&str]) -> AgentOptions {
        let mut all = vec!["agent"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).unwrap().opts
    }

    #[test]
    fn models_split_on_commas_and_sandbox_plans() {
        let o = opts(&[
            "--model=a,b",
            "--gateway-url=http://gw:80/",
            "--sandbox-url=http://127.0.0.1:8888",
        ]);
        assert_eq!(o.models, ["a", "b"]);
        assert_eq!(o.check().map_err(|e| e.to_string()), Ok(()));
        assert_eq!(
            o.sandbox_plan().unwrap(),
            SandboxPlan::Direct {
                url: "http://127.0.0.1:8888".into()
            }
        );
        let o = opts(&[
            "--model=a",
            "--gateway-url=http://gw",
            "--sandbox-router-url=http://router:8080",
            "--sandbox-template=python",
        ]);
        assert_eq!(
            o.sandbox_plan().unwrap(),
            SandboxPlan::Claim {
                router_url: "http://router:8080".into(),
                warm_pool: "python-pool".into()
            }
        );
    }

    #[test]
    fn refuses_bad_flags() {
        let o = opts(&["--model=a", "--gateway-url=https://gw"]);
        assert_eq!(
            o.check().unwrap_err().to_string(),
            "--gateway-url: `https://gw`: expected http://HOST[:PORT][/PATH]"
        );
        assert_eq!(
            o.sandbox_plan().unwrap_err().to_string(),
            "--sandbox-url: give --sandbox-url, or --sandbox-router-url with --warm-pool to claim sandboxes"
        );
        let o = opts(&["--model=a", "--gateway-url=http://gw", "--max-steps=0"]);
        assert_eq!(
            o.check().unwrap_err().to_string(),
            "--max-steps: must be between 1 and --max-steps-limit (64)"
        );
    }
}
