//! Starts `switchyard epp` inside the test's process (`epp::server::start` on flags parsed as
//! the binary parses them) on 127.0.0.1 with every port 0, and waits until it has scraped what
//! the mock model servers serve.

use std::fmt::Debug;
use std::ops::Deref;
use std::time::{Duration, Instant};

use clap::Parser;
use switchyard::epp::args::EppArgs;
use switchyard::epp::endpoint::EndpointMetrics;
use switchyard::epp::server::{start, RunningEpp, StartError};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: EppArgs,
}

/// Every server port chosen by the OS, on loopback only (the EPP's and BBR's flags alike).
pub const LOOPBACK_PORTS: [&str; 8] = [
    "--grpc-port",
    "0",
    "--grpc-health-port",
    "0",
    "--metrics-port",
    "0",
    "--bind-address",
    "127.0.0.1",
];

/// How long [`TestEpp::wait_until_scraped`] waits (a loaded 2-core machine included).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

enum Endpoints {
    /// No endpoint flag: Kubernetes discovery, configured through the extra flags.
    Discovered,
    /// `--endpoints a,b,...`.
    List(String),
    /// `--endpoints-file` with this pool YAML.
    File(String),
}

/// The flags of an in-process EPP: `epp`, [`LOOPBACK_PORTS`], the endpoints, `--config-text`
/// when set, then the extra flags.
pub struct InProcessEpp {
    endpoints: Endpoints,
    config: Option<String>,
    flags: Vec<String>,
}

impl InProcessEpp {
    /// Endpoints given as `--endpoints a,b,...`.
    pub fn endpoints<T: ToString>(list: impl IntoIterator<Item = T>) -> Self {
        let list: Vec<String> = list.into_iter().map(|e| e.to_string()).collect();
        Self::with(Endpoints::List(list.join(",")))
    }

    /// Endpoints (and objectives, model rewrites) from a `--endpoints-file` holding `yaml`; the
    /// file lives as long as the EPP.
    pub fn endpoints_file(yaml: impl Into<String>) -> Self {
        Self::with(Endpoints::File(yaml.into()))
    }

    /// No endpoint flag: endpoints come from Kubernetes (`--pool-name` etc. in [`Self::flags`]).
    pub fn discovered() -> Self {
        Self::with(Endpoints::Discovered)
    }

    fn with(endpoints: Endpoints) -> Self {
        Self {
            endpoints,
            config: None,
            flags: Vec::new(),
        }
    }

    /// `--config-text` (an EndpointPickerConfig).
    pub fn config(mut self, text: impl Into<String>) -> Self {
        self.config = Some(text.into());
        self
    }

    /// Flags appended after the standard ones.
    pub fn flags(mut self, flags: &[&str]) -> Self {
        self.flags.extend(flags.iter().map(|f| f.to_string()));
        self
    }

    /// Starts the EPP; the error is `epp::server::start`'s.
    pub async fn try_start(self) -> Result<TestEpp, StartError> {
        let mut argv: Vec<String> = vec!["epp".into()];
        argv.extend(LOOPBACK_PORTS.map(String::from));
        let mut pool_file = None;
        match self.endpoints {
            Endpoints::Discovered => {}
            Endpoints::List(list) => argv.extend(["--endpoints".into(), list]),
            Endpoints::File(yaml) => {
                let file = tempfile::NamedTempFile::new().expect("creating the pool file");
                std::fs::write(file.path(), yaml).expect("writing the pool file");
                argv.extend(["--endpoints-file".into(), file.path().display().to_string()]);
                pool_file = Some(file);
            }
        }
        if let Some(config) = self.config {
            argv.extend(["--config-text".into(), config]);
        }
        argv.extend(self.flags);
        let args = Cli::try_parse_from(argv).expect("EPP flags parse").args;
        Ok(TestEpp {
            epp: start(args).await?,
            _pool_file: pool_file,
        })
    }

    /// Starts the EPP; fails the test if it does not start.
    pub async fn start(self) -> TestEpp {
        self.try_start().await.expect("starting the EPP")
    }
}

/// A running in-process EPP (its [`RunningEpp`] through `Deref`) and its pool file.
pub struct TestEpp {
    epp: RunningEpp,
    _pool_file: Option<tempfile::NamedTempFile>,
}

impl Deref for TestEpp {
    type Target = RunningEpp;
    fn deref(&self) -> &RunningEpp {
        &self.epp
    }
}

impl TestEpp {
    /// [`RunningEpp::shutdown`].
    pub async fn shutdown(self) {
        self.epp.shutdown().await;
    }

    /// Waits until the datastore holds exactly `want.len()` endpoints, every one scraped, and
    /// `view` of their metrics (in datastore order) equals `want`.
    pub async fn wait_until_scraped<T: PartialEq + Debug>(
        &self,
        want: &[T],
        view: impl Fn(&EndpointMetrics) -> T,
    ) {
        let deadline = Instant::now() + SCRAPE_TIMEOUT;
        loop {
            let got: Vec<Option<T>> = self
                .datastore
                .snapshot()
                .iter()
                .map(|s| s.metrics.updated_at.map(|_| view(&s.metrics)))
                .collect();
            if got.len() == want.len() && got.iter().zip(want).all(|(g, w)| g.as_ref() == Some(w)) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "metrics never scraped: want {want:?}, got {got:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// This EPP's Prometheus page.
    pub async fn metrics_text(&self) -> String {
        let url = format!("http://{}/metrics", self.metrics_addr);
        super::HttpClient::new()
            .get(&url)
            .await
            .expect("GET /metrics")
            .text()
    }
}
