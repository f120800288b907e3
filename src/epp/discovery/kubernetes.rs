//! Kubernetes discovery: watches the InferencePool named on the command line (or uses the
//! `--endpoint-selector`/`--endpoint-target-ports` flags instead), the Pods it selects, and the
//! InferenceObjective / InferenceModelRewrite objects that reference it, and feeds the datastore.
//!
//! One task owns all state. Each collection is followed with `kube::runtime::watcher`, which
//! lists, then watches from the list's resourceVersion, and re-lists when the API server answers
//! `410 Gone`. A re-list is applied as one `Reset` once it is complete, so the endpoint set never
//! shows a half-listed pool.
//!
//! ```text
//!   pool watch ──► target (selector, ports) ──┬─ selector changed ─► restart pod watch ─► Reset
//!                                             └─ ports changed ────► recompute ──────────► Reset
//!   pod watch ───► PodInfo per pod ─► endpoints per pod ─► Upsert / Remove (diff per pod)
//!   objective / rewrite watches ─► RequestPolicy ─► Datastore::set_policy
//! ```

pub mod policy;
pub mod pool;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::ResourceExt;
use tokio::sync::watch;

use super::{Discovery, DiscoveryError};
use crate::epp::datastore::{Datastore, DiscoveryEvent};
use crate::epp::endpoint::Endpoint;
use policy::{Objective, PoolRef, Rewrite};
use pool::{PodInfo, PoolError, PoolTarget};

/// Most objects of one kind kept in memory; beyond it new names are ignored (and logged), so a
/// runaway controller creating pods cannot grow the EPP without bound.
pub const DEFAULT_MAX_OBJECTS: usize = 10_000;

/// Where to find the pool (the reference flags of the same names).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KubeDiscoveryConfig {
    pub pool_name: String,
    pub pool_namespace: String,
    /// `inference.networking.k8s.io` (v1) or `inference.networking.x-k8s.io` (v1alpha2).
    pub pool_group: String,
    /// When set, pods are selected by this label selector and no CRD is read.
    pub endpoint_selector: Option<String>,
    /// Target ports for `endpoint_selector` mode.
    pub endpoint_target_ports: Vec<u16>,
}

impl KubeDiscoveryConfig {
    /// Checks the flags without contacting the API server.
    pub fn validate(&self) -> Result<(), KubeDiscoveryError> {
        if self.pool_namespace.is_empty() {
            return Err(KubeDiscoveryError::MissingFlag("--pool-namespace"));
        }
        match &self.endpoint_selector {
            Some(selector) => {
                PoolTarget::from_flags(selector, &self.endpoint_target_ports)?;
            }
            None => {
                if self.pool_name.is_empty() {
                    return Err(KubeDiscoveryError::MissingFlag("--pool-name"));
                }
                pool::pool_api_resource(&self.pool_group)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeDiscoveryError {
    #[error("{0} is required")]
    MissingFlag(&'static str),
    #[error(transparent)]
    Pool(#[from] PoolError),
    #[error("the {0} watch ended unexpectedly")]
    WatchEnded(&'static str),
}

/// Discovery from the Kubernetes API (see the module docs).
pub struct KubernetesDiscovery {
    client: kube::Client,
    config: KubeDiscoveryConfig,
    max_objects: usize,
}

impl KubernetesDiscovery {
    pub fn new(client: kube::Client, config: KubeDiscoveryConfig) -> Self {
        KubernetesDiscovery {
            client,
            config,
            max_objects: DEFAULT_MAX_OBJECTS,
        }
    }

    /// Overrides the per-kind object cap ([`DEFAULT_MAX_OBJECTS`]).
    pub fn with_max_objects(mut self, max_objects: usize) -> Self {
        self.max_objects = max_objects;
        self
    }
}

impl Discovery for KubernetesDiscovery {
    fn run(
        self: Box<Self>,
        datastore: Arc<Datastore>,
        shutdown: watch::Receiver<bool>,
    ) -> Pin<Box<dyn Future<Output = Result<(), DiscoveryError>> + Send>> {
        Box::pin(async move {
            self.config.validate()?;
            Runner::new(*self, datastore).run(shutdown).await?;
            Ok(())
        })
    }
}

type WatchStream<K> = BoxStream<'static, Result<Event<K>, watcher::Error>>;

fn watch_stream<K>(api: Api<K>, config: watcher::Config) -> WatchStream<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher::watcher(api, config).default_backoff().boxed()
}

/// Next item of an optional stream; pending forever when there is none (a `select!` arm that
/// never fires). `Some(None)` means the stream ended.
async fn next_of<K>(
    stream: &mut Option<WatchStream<K>>,
) -> Option<Result<Event<K>, watcher::Error>> {
    match stream {
        Some(s) => s.next().await,
        None => std::future::pending().await,
    }
}

/// What a watch event did to a [`Mirror`].
#[derive(Debug, PartialEq, Eq)]
enum Change {
    /// A complete (re-)list replaced everything.
    Relisted,
    /// The object of this name was added, changed or removed.
    Changed(String),
    Unchanged,
}

/// A local copy of one watched collection, by object name. During a (re-)list new objects are
/// collected aside and swapped in at the end, so objects deleted while the watch was broken go.
struct Mirror<T> {
    kind: &'static str,
    items: BTreeMap<String, T>,
    relisting: Option<BTreeMap<String, T>>,
    cap: usize,
}

impl<T: PartialEq> Mirror<T> {
    fn new(kind: &'static str, cap: usize) -> Self {
        Mirror {
            kind,
            items: BTreeMap::new(),
            relisting: None,
            cap,
        }
    }

    fn insert_capped(
        kind: &str,
        cap: usize,
        map: &mut BTreeMap<String, T>,
        name: String,
        value: T,
    ) -> bool {
        if map.len() >= cap && !map.contains_key(&name) {
            tracing::error!(kind, name, cap, "too many objects; ignoring this one");
            return false;
        }
        map.insert(name, value);
        true
    }

    /// Applies one watcher event; `convert` returns `None` for objects that do not count (they
    /// are treated as absent).
    fn apply<K: kube::Resource>(
        &mut self,
        event: Event<K>,
        convert: impl Fn(&K) -> Option<T>,
    ) -> Change {
        match event {
            Event::Init => {
                tracing::debug!(kind = self.kind, "listing");
                self.relisting = Some(BTreeMap::new());
                Change::Unchanged
            }
            Event::InitApply(obj) => {
                if let (Some(buf), Some(value)) = (self.relisting.as_mut(), convert(&obj)) {
                    Self::insert_capped(self.kind, self.cap, buf, obj.name_any(), value);
                }
                Change::Unchanged
            }
            Event::InitDone => {
                if let Some(buf) = self.relisting.take() {
                    self.items = buf;
                }
                tracing::debug!(kind = self.kind, count = self.items.len(), "listed");
                Change::Relisted
            }
            Event::Apply(obj) => {
                let name = obj.name_any();
                match convert(&obj) {
                    Some(value) if self.items.get(&name) == Some(&value) => Change::Unchanged,
                    Some(value) => {
                        if Self::insert_capped(
                            self.kind,
                            self.cap,
                            &mut self.items,
                            name.clone(),
                            value,
                        ) {
                            Change::Changed(name)
                        } else {
                            Change::Unchanged
                        }
                    }
                    None => self.remove(name),
                }
            }
            Event::Delete(obj) => self.remove(obj.name_any()),
        }
    }

    fn remove(&mut self, name: String) -> Change {
        if self.items.remove(&name).is_some() {
            Change::Changed(name)
        } else {
            Change::Unchanged
        }
    }

    fn clear(&mut self) {
        self.items.clear();
        self.relisting = None;
    }
}

/// The discovery task's state.
struct Runner {
    client: kube::Client,
    config: KubeDiscoveryConfig,
    datastore: Arc<Datastore>,
    /// The pool's target; `None` until the pool is seen (or after it is deleted).
    target: Option<PoolTarget>,
    pods: Mirror<PodInfo>,
    /// Endpoints currently in the datastore, by pod name (only pods with at least one).
    published: BTreeMap<String, Vec<Endpoint>>,
    pod_stream: Option<WatchStream<Pod>>,
    /// The pool object seen during a pool (re-)list.
    pool_relist: Option<Option<DynamicObject>>,
    objectives: Mirror<Objective>,
    rewrites: Mirror<Rewrite>,
    pool_ref: PoolRef,
}

impl Runner {
    fn new(discovery: KubernetesDiscovery, datastore: Arc<Datastore>) -> Self {
        let cap = discovery.max_objects;
        let pool_ref = PoolRef {
            name: discovery.config.pool_name.clone(),
            group: discovery.config.pool_group.clone(),
        };
        Runner {
            client: discovery.client,
            config: discovery.config,
            datastore,
            target: None,
            pods: Mirror::new("Pod", cap),
            published: BTreeMap::new(),
            pod_stream: None,
            pool_relist: None,
            objectives: Mirror::new("InferenceObjective", cap),
            rewrites: Mirror::new("InferenceModelRewrite", cap),
            pool_ref,
        }
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) -> Result<(), KubeDiscoveryError> {
        let ns = self.config.pool_namespace.clone();
        let mut pool_stream: Option<WatchStream<DynamicObject>> = None;
        let mut objective_stream: Option<WatchStream<DynamicObject>> = None;
        let mut rewrite_stream: Option<WatchStream<DynamicObject>> = None;
        match self.config.endpoint_selector.clone() {
            Some(selector) => {
                // Standalone mode: the target is fixed and no CRD is read (as the reference
                // does when it runs without an InferencePool).
                let target = PoolTarget::from_flags(&selector, &self.config.endpoint_target_ports)?;
                tracing::info!(namespace = %ns, selector = %target.selector, ports = ?target.target_ports, "discovering endpoints by label selector");
                self.start_pod_watch(&target);
                self.target = Some(target);
            }
            None => {
                let pool_ar = pool::pool_api_resource(&self.config.pool_group)?;
                tracing::info!(namespace = %ns, pool = %self.config.pool_name, group = %self.config.pool_group, "watching InferencePool");
                let api = Api::<DynamicObject>::namespaced_with(self.client.clone(), &ns, &pool_ar);
                let by_name = watcher::Config::default()
                    .fields(&format!("metadata.name={}", self.config.pool_name));
                pool_stream = Some(watch_stream(api, by_name));
                let objectives = policy::objective_api_resource();
                let api =
                    Api::<DynamicObject>::namespaced_with(self.client.clone(), &ns, &objectives);
                objective_stream = Some(watch_stream(api, watcher::Config::default()));
                let rewrites = policy::rewrite_api_resource();
                let api =
                    Api::<DynamicObject>::namespaced_with(self.client.clone(), &ns, &rewrites);
                rewrite_stream = Some(watch_stream(api, watcher::Config::default()));
            }
        }

        loop {
            tokio::select! {
                changed = shutdown.changed() => {
                    // A dropped sender also means shut down.
                    if changed.is_err() || *shutdown.borrow() {
                        tracing::info!("Kubernetes discovery stopping");
                        return Ok(());
                    }
                }
                event = next_of(&mut pool_stream) => {
                    match event.ok_or(KubeDiscoveryError::WatchEnded("InferencePool"))? {
                        Ok(event) => self.on_pool_event(event),
                        Err(e) => log_watch_error("InferencePool", &e),
                    }
                }
                event = next_of(&mut self.pod_stream) => {
                    match event.ok_or(KubeDiscoveryError::WatchEnded("Pod"))? {
                        Ok(event) => self.on_pod_event(event),
                        Err(e) => log_watch_error("Pod", &e),
                    }
                }
                event = next_of(&mut objective_stream) => {
                    match event.ok_or(KubeDiscoveryError::WatchEnded("InferenceObjective"))? {
                        Ok(event) => {
                            let pool_ref = &self.pool_ref;
                            let change = self.objectives.apply(event, |o| policy::parse_objective(o, pool_ref));
                            self.on_policy_change(change);
                        }
                        Err(e) => log_watch_error("InferenceObjective", &e),
                    }
                }
                event = next_of(&mut rewrite_stream) => {
                    match event.ok_or(KubeDiscoveryError::WatchEnded("InferenceModelRewrite"))? {
                        Ok(event) => {
                            let pool_ref = &self.pool_ref;
                            let change = self.rewrites.apply(event, |o| policy::parse_rewrite(o, pool_ref));
                            self.on_policy_change(change);
                        }
                        Err(e) => log_watch_error("InferenceModelRewrite", &e),
                    }
                }
            }
        }
    }

    fn start_pod_watch(&mut self, target: &PoolTarget) {
        let api = Api::<Pod>::namespaced(self.client.clone(), &self.config.pool_namespace);
        let config = watcher::Config::default().labels(&target.selector.to_string());
        self.pod_stream = Some(watch_stream(api, config));
    }

    fn on_pool_event(&mut self, event: Event<DynamicObject>) {
        match event {
            Event::Init => self.pool_relist = Some(None),
            Event::InitApply(obj) => {
                if let Some(slot) = self.pool_relist.as_mut() {
                    *slot = Some(obj);
                }
            }
            Event::InitDone => {
                let pool = self.pool_relist.take().flatten();
                self.set_pool(pool);
            }
            Event::Apply(obj) => self.set_pool(Some(obj)),
            Event::Delete(_) => self.set_pool(None),
        }
    }

    fn set_pool(&mut self, pool: Option<DynamicObject>) {
        let pool = pool.filter(|p| p.metadata.deletion_timestamp.is_none());
        let Some(pool) = pool else {
            if self.target.take().is_some() {
                // As the reference: a deleted pool empties the datastore.
                tracing::info!(pool = %self.config.pool_name, "InferencePool gone; clearing endpoints");
                self.pod_stream = None;
                self.pods.clear();
                self.published.clear();
                self.datastore.apply(DiscoveryEvent::Reset(Vec::new()));
                // No pool, no readiness (the reference reports not ready until it is back).
                self.datastore.mark_unsynced();
            } else {
                tracing::info!(pool = %self.config.pool_name, "InferencePool not found; waiting for it");
            }
            return;
        };
        let target = match PoolTarget::from_pool(&self.config.pool_group, &pool) {
            Ok(t) => t,
            Err(e) => {
                // Keep routing to the last good target rather than dropping every endpoint.
                tracing::error!(error = %e, "ignoring invalid InferencePool update");
                return;
            }
        };
        match &self.target {
            Some(old) if *old == target => {}
            Some(old) if old.selector == target.selector => {
                tracing::info!(ports = ?target.target_ports, "InferencePool target ports changed; recomputing endpoints");
                self.target = Some(target);
                self.reset_endpoints();
            }
            _ => {
                tracing::info!(selector = %target.selector, ports = ?target.target_ports, "InferencePool selector set; listing pods");
                // The new watch lists the pods the new selector matches; its InitDone replaces
                // the endpoint set in one Reset (until then the old set keeps serving).
                self.start_pod_watch(&target);
                self.target = Some(target);
            }
        }
    }

    fn on_pod_event(&mut self, event: Event<Pod>) {
        match self.pods.apply(event, |p| Some(PodInfo::from_pod(p))) {
            Change::Relisted => {
                self.reset_endpoints();
                if !self.datastore.is_synced() {
                    tracing::info!(
                        endpoints = self.datastore.len(),
                        "first full sync of the pool done"
                    );
                    self.datastore.mark_synced();
                }
            }
            Change::Changed(name) => self.update_pod(&name),
            Change::Unchanged => {}
        }
    }

    fn reset_endpoints(&mut self) {
        let Some(target) = &self.target else { return };
        self.published.clear();
        let mut all = Vec::new();
        for (name, info) in &self.pods.items {
            let endpoints = info.endpoints(target);
            if !endpoints.is_empty() {
                all.extend(endpoints.iter().cloned());
                self.published.insert(name.clone(), endpoints);
            }
        }
        tracing::info!(
            pods = self.published.len(),
            endpoints = all.len(),
            "endpoint set listed"
        );
        self.datastore.apply(DiscoveryEvent::Reset(all));
    }

    /// Applies the difference between what a pod published and what it serves now.
    fn update_pod(&mut self, name: &str) {
        let Some(target) = &self.target else { return };
        let new = self
            .pods
            .items
            .get(name)
            .map(|p| p.endpoints(target))
            .unwrap_or_default();
        let old = self.published.remove(name).unwrap_or_default();
        for gone in old.iter().filter(|o| !new.iter().any(|n| n.name == o.name)) {
            self.datastore
                .apply(DiscoveryEvent::Remove(gone.name.clone()));
        }
        for changed in new.iter().filter(|n| !old.contains(n)) {
            self.datastore
                .apply(DiscoveryEvent::Upsert(changed.clone()));
        }
        match (old.is_empty(), new.is_empty()) {
            (true, false) => tracing::info!(pod = name, endpoints = new.len(), "pod added"),
            (false, true) => tracing::info!(pod = name, "pod removed"),
            _ => tracing::debug!(pod = name, endpoints = new.len(), "pod updated"),
        }
        if !new.is_empty() {
            self.published.insert(name.to_string(), new);
        }
    }

    fn on_policy_change(&mut self, change: Change) {
        if change == Change::Unchanged {
            return;
        }
        let (policy, _) = policy::build_policy(&self.objectives.items, &self.rewrites.items);
        tracing::info!(
            objectives = policy.objectives.len(),
            rewrites = policy.model_rewrites.len(),
            "request policy updated"
        );
        self.datastore.set_policy(policy);
    }
}

fn log_watch_error(kind: &'static str, error: &watcher::Error) {
    match error {
        // Expected after a long disconnection or etcd compaction: the watcher re-lists.
        watcher::Error::WatchError(e) if e.code == 410 => {
            tracing::info!(kind, "watch expired (410 Gone); re-listing")
        }
        other => tracing::warn!(kind, error = %other, "watch failed; retrying with backoff"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "m"}},
            "status": {"podIP": "10.0.0.1", "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]}
        }))
        .unwrap()
    }

    fn convert(p: &Pod) -> Option<PodInfo> {
        Some(PodInfo::from_pod(p))
    }

    #[test]
    fn mirror_relist_swaps_at_init_done_and_reports_changes() {
        let mut m = Mirror::new("Pod", 10);
        assert_eq!(
            m.apply(Event::Apply(pod("a", true)), convert),
            Change::Changed("a".into())
        );
        assert_eq!(
            m.apply(Event::Apply(pod("a", true)), convert),
            Change::Unchanged
        );
        assert_eq!(
            m.apply(Event::Apply(pod("a", false)), convert),
            Change::Changed("a".into())
        );
        // A re-list that no longer contains `a` drops it only when complete.
        assert_eq!(m.apply(Event::Init, convert), Change::Unchanged);
        assert_eq!(
            m.apply(Event::InitApply(pod("b", true)), convert),
            Change::Unchanged
        );
        assert_eq!(m.items.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(m.apply(Event::InitDone, convert), Change::Relisted);
        assert_eq!(m.items.keys().collect::<Vec<_>>(), ["b"]);
        assert_eq!(
            m.apply(Event::Delete(pod("b", true)), convert),
            Change::Changed("b".into())
        );
        assert_eq!(
            m.apply(Event::Delete(pod("b", true)), convert),
            Change::Unchanged
        );
        // `None` from convert counts as absent.
        m.apply(Event::Apply(pod("c", true)), convert);
        assert_eq!(
            m.apply(Event::Apply(pod("c", true)), |_| None),
            Change::Changed("c".into())
        );
        assert!(m.items.is_empty());
    }

    #[test]
    fn mirror_cap_ignores_new_names_but_updates_known_ones() {
        let mut m = Mirror::new("Pod", 2);
        m.apply(Event::Apply(pod("a", true)), convert);
        m.apply(Event::Apply(pod("b", true)), convert);
        assert_eq!(
            m.apply(Event::Apply(pod("c", true)), convert),
            Change::Unchanged
        );
        assert_eq!(m.items.len(), 2);
        assert_eq!(
            m.apply(Event::Apply(pod("b", false)), convert),
            Change::Changed("b".into())
        );
        m.apply(Event::Init, convert);
        for n in ["x", "y", "z"] {
            m.apply(Event::InitApply(pod(n, true)), convert);
        }
        m.apply(Event::InitDone, convert);
        assert_eq!(m.items.keys().collect::<Vec<_>>(), ["x", "y"]);
    }

    #[test]
    fn config_validation() {
        let mut c = KubeDiscoveryConfig {
            pool_name: "p".into(),
            pool_namespace: "ns".into(),
            pool_group: pool::GROUP_V1.into(),
            endpoint_selector: None,
            endpoint_target_ports: vec![],
        };
        assert!(c.validate().is_ok());
        c.pool_group = "example.com".into();
        assert!(matches!(
            c.validate(),
            Err(KubeDiscoveryError::Pool(PoolError::UnsupportedGroup(_)))
        ));
        c.endpoint_selector = Some("app=x".into());
        assert!(matches!(
            c.validate(),
            Err(KubeDiscoveryError::Pool(PoolError::PortCount(0)))
        ));
        c.endpoint_target_ports = vec![8000];
        assert!(c.validate().is_ok());
        c.pool_namespace.clear();
        assert!(matches!(
            c.validate(),
            Err(KubeDiscoveryError::MissingFlag("--pool-namespace"))
        ));
    }
}
