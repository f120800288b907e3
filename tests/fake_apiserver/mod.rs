//! A fake Kubernetes API server for the EPP's Kubernetes tests.
//!
//! It is a fake because no real API server (nor etcd) can be installed on these machines. It
//! implements the slice of the API the EPP uses, behaving as the real one does where the client
//! can tell: plain HTTP on 127.0.0.1:0, JSON bodies, `Status` errors (404 NotFound, 409
//! AlreadyExists/Conflict on a stale `metadata.resourceVersion`, 500), one monotonically
//! increasing resourceVersion across all objects, list (`labelSelector`, `fieldSelector`,
//! `metadata.resourceVersion` on the list) and watch (`?watch=true&resourceVersion=N`: replay
//! of the events after N, then live events as newline-delimited JSON `ADDED`/`MODIFIED`/
//! `DELETED`/`BOOKMARK`; an object that stops matching a label selector is `DELETED` for that
//! watch; a resourceVersion older than the retained history gets an `ERROR` event with a 410
//! `Expired` status, as the real server sends it), get/create/update for namespaced objects
//! (pods, inferencepools, inferenceobjectives, inferencemodelrewrites, leases), and create for
//! the cluster-scoped `tokenreviews` and `subjectaccessreviews`.
//!
//! Test-side controls: [`FakeApiServer::apply`]/[`FakeApiServer::delete`] change objects as a
//! controller would, [`FakeApiServer::close_watches`] cuts every open watch connection,
//! [`FakeApiServer::expire_watches`] simulates compaction (every open watch
//! ends and its resourceVersion becomes too old), [`FakeApiServer::set_failing`] makes one
//! resource answer 500, and tokens/users back the review endpoints.

#![allow(dead_code)] // each test binary uses a different part

pub mod objects;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{Method, StatusCode, Uri};
use axum::response::Response;
use parking_lot::Mutex;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc, watch};

/// Events kept for watch replay; older resourceVersions get 410.
const HISTORY: usize = 4096;
/// How often an idle watch gets a BOOKMARK.
const BOOKMARK_EVERY: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as the watch cache remembers it.
#[derive(Debug)]
struct StoredEvent {
    rv: u64,
    resource: String,
    namespace: String,
    kind: EventType,
    old: Option<Value>,
    new: Value,
}

/// `group/plural` ("" group for core), namespace, name.
type Key = (String, String, String);

#[derive(Default)]
struct Inner {
    rv: u64,
    /// Watches must start at or after this resourceVersion.
    oldest_watchable: u64,
    objects: BTreeMap<Key, Value>,
    log: VecDeque<Arc<StoredEvent>>,
    tokens: HashMap<String, (String, Vec<String>)>,
    metrics_readers: HashSet<String>,
    failing: HashSet<String>,
    requests: HashMap<String, usize>,
    uid: u64,
}

struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Arc<StoredEvent>>,
    /// Bumped by `expire_watches`; every open watch ends.
    generation: watch::Sender<u64>,
}

/// A running fake API server; stops when dropped.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `group/plural` for an object's apiVersion and kind (every kind used here pluralises with "s").
pub fn resource_of(api_version: &str, kind: &str) -> String {
    let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
    format!("{group}/{}s", kind.to_ascii_lowercase())
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn reply(code: StatusCode, body: &Value) -> Response {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn error(code: StatusCode, reason: &str, message: &str) -> Response {
    reply(code, &status_body(code.as_u16(), reason, message))
}

fn labels_of(obj: &Value) -> BTreeMap<String, String> {
    obj["metadata"]["labels"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// Equality-based label selector matching (`a=b`, `a==b`, `a!=b`, `a`, `!a`).
fn label_selector_matches(selector: &str, obj: &Value) -> bool {
    let labels = labels_of(obj);
    selector
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .all(|req| {
            if let Some((k, v)) = req.split_once("!=") {
                labels.get(k.trim()).map(String::as_str) != Some(v.trim())
            } else if let Some((k, v)) = req.split_once("==").or_else(|| req.split_once('=')) {
                labels.get(k.trim()).map(String::as_str) == Some(v.trim())
            } else if let Some(k) = req.strip_prefix('!') {
                !labels.contains_key(k.trim())
            } else {
                labels.contains_key(req)
            }
        })
}

fn field_selector_matches(selector: &str, obj: &Value) -> bool {
    selector
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .all(|req| {
            let (field, want) = req.split_once('=').unwrap_or((req, ""));
            let want = want.trim_start_matches('=');
            let got = match field {
                "metadata.name" => obj["metadata"]["name"].as_str(),
                "metadata.namespace" => obj["metadata"]["namespace"].as_str(),
                _ => return false,
            };
            got == Some(want)
        })
}

#[derive(Clone, Default)]
struct Selectors {
    label: Option<String>,
    field: Option<String>,
}

impl Selectors {
    fn from_query(q: &HashMap<String, String>) -> Self {
        Selectors {
            label: q.get("labelSelector").cloned(),
            field: q.get("fieldSelector").cloned(),
        }
    }

    fn matches(&self, obj: &Value) -> bool {
        self.label
            .as_deref()
            .is_none_or(|s| label_selector_matches(s, obj))
            && self
                .field
                .as_deref()
                .is_none_or(|s| field_selector_matches(s, obj))
    }

    /// What a watch with these selectors sees of a stored event, like the real watch cache.
    fn view(&self, ev: &StoredEvent) -> Option<(EventType, Value)> {
        let new_matches = self.matches(&ev.new);
        let old_matches = ev.old.as_ref().is_some_and(|o| self.matches(o));
        match ev.kind {
            EventType::Added => new_matches.then(|| (EventType::Added, ev.new.clone())),
            EventType::Modified => match (old_matches, new_matches) {
                (true, true) => Some((EventType::Modified, ev.new.clone())),
                (false, true) => Some((EventType::Added, ev.new.clone())),
                (true, false) => Some((EventType::Deleted, ev.new.clone())),
                (false, false) => None,
            },
            EventType::Deleted => {
                (new_matches || old_matches).then(|| (EventType::Deleted, ev.new.clone()))
            }
        }
    }
}

/// A parsed request path.
struct Target {
    resource: String,
    api_version: String,
    namespace: Option<String>,
    name: Option<String>,
}

fn parse_path(path: &str) -> Option<Target> {
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match parts.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let (namespace, plural, name) = match rest {
        ["namespaces", ns, plural] => (Some(ns.to_string()), *plural, None),
        ["namespaces", ns, plural, name] => (Some(ns.to_string()), *plural, Some(name.to_string())),
        [plural] => (None, *plural, None),
        [plural, name] => (None, *plural, Some(name.to_string())),
        _ => return None,
    };
    let api_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(Target {
        resource: format!("{group}/{plural}"),
        api_version,
        namespace,
        name,
    })
}

fn now_rfc3339() -> String {
    k8s_openapi::chrono::Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true)
}

impl Shared {
    fn count(&self, what: String) {
        *self.inner.lock().requests.entry(what).or_default() += 1;
    }

    /// Stores `obj` under a new resourceVersion and records the event (caller holds the lock).
    fn commit(&self, inner: &mut Inner, key: Key, kind: EventType, mut obj: Value) -> Value {
        inner.rv += 1;
        let rv = inner.rv;
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        let old = match kind {
            EventType::Deleted => inner.objects.remove(&key),
            _ => inner.objects.insert(key.clone(), obj.clone()),
        };
        let ev = Arc::new(StoredEvent {
            rv,
            resource: key.0.clone(),
            namespace: key.1.clone(),
            kind,
            old,
            new: obj.clone(),
        });
        inner.log.push_back(ev.clone());
        while inner.log.len() > HISTORY {
            if let Some(dropped) = inner.log.pop_front() {
                inner.oldest_watchable = inner.oldest_watchable.max(dropped.rv);
            }
        }
        // No receivers is fine.
        let _ = self.events.send(ev);
        obj
    }

    /// Create (`update == false`) or update, with API-server semantics.
    fn write(
        &self,
        resource: &str,
        namespace: &str,
        mut obj: Value,
        update: bool,
    ) -> Result<Value, (StatusCode, &'static str, String)> {
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            return Err((
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name: Required value".into(),
            ));
        }
        let key = (resource.to_string(), namespace.to_string(), name.clone());
        let mut inner = self.inner.lock();
        let existing = inner.objects.get(&key).cloned();
        obj["metadata"]["namespace"] = json!(namespace);
        match (existing, update) {
            (Some(_), false) => Err((
                StatusCode::CONFLICT,
                "AlreadyExists",
                format!("{resource} \"{name}\" already exists"),
            )),
            (None, true) => Err((
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("{resource} \"{name}\" not found"),
            )),
            (None, false) => {
                inner.uid += 1;
                obj["metadata"]["uid"] = json!(format!("uid-{}", inner.uid));
                if obj["metadata"]["creationTimestamp"].is_null() {
                    obj["metadata"]["creationTimestamp"] = json!(now_rfc3339());
                }
                Ok(self.commit(&mut inner, key, EventType::Added, obj))
            }
            (Some(current), true) => {
                let sent = obj["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                let stored = current["metadata"]["resourceVersion"]
                    .as_str()
                    .unwrap_or_default();
                if !sent.is_empty() && sent != stored {
                    return Err((
                        StatusCode::CONFLICT,
                        "Conflict",
                        format!("Operation cannot be fulfilled on {resource} \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
                    ));
                }
                obj["metadata"]["uid"] = current["metadata"]["uid"].clone();
                obj["metadata"]["creationTimestamp"] =
                    current["metadata"]["creationTimestamp"].clone();
                if current == obj {
                    return Ok(current);
                }
                Ok(self.commit(&mut inner, key, EventType::Modified, obj))
            }
        }
    }
}

impl FakeApiServer {
    pub async fn start() -> FakeApiServer {
        let (events, _) = broadcast::channel(HISTORY);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner::default()),
            events,
            generation: watch::channel(0).0,
        });
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        FakeApiServer { addr, shared, task }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A `kube::Client` talking plain HTTP to this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(self.url().parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    /// Creates or updates `obj` (its apiVersion/kind/metadata.namespace pick the collection),
    /// ignoring resourceVersion like a forced apply. Returns the stored object.
    pub fn apply(&self, obj: Value) -> Value {
        let resource = resource_of(
            obj["apiVersion"].as_str().unwrap(),
            obj["kind"].as_str().unwrap(),
        );
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let exists = self.get(&resource, &ns, &name).is_some();
        let mut obj = obj;
        if let Some(m) = obj["metadata"].as_object_mut() {
            m.remove("resourceVersion");
        }
        self.shared.write(&resource, &ns, obj, exists).unwrap()
    }

    /// Deletes an object (`resource` as `group/plural`, e.g. `/pods`).
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let key = (
            resource.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        let mut inner = self.shared.inner.lock();
        let obj = inner
            .objects
            .get(&key)
            .cloned()
            .expect("object to delete exists");
        self.shared.commit(&mut inner, key, EventType::Deleted, obj);
    }

    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let key = (
            resource.to_string(),
            namespace.to_string(),
            name.to_string(),
        );
        self.shared.inner.lock().objects.get(&key).cloned()
    }

    /// Drops every open watch connection (an API server restart or a load balancer cutting
    /// long-lived connections): the streams end, but their resourceVersions stay watchable, so
    /// clients resume where they were and miss nothing.
    pub fn close_watches(&self) {
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Simulates etcd compaction: every open watch ends, and every resourceVersion handed out so
    /// far becomes too old to watch from (410 Gone), so clients must re-list.
    pub fn expire_watches(&self) {
        let mut inner = self.shared.inner.lock();
        inner.rv += 1;
        inner.oldest_watchable = inner.rv;
        inner.log.clear();
        drop(inner);
        self.shared.generation.send_modify(|g| *g += 1);
    }

    /// Makes every request for `resource` (`group/plural`) fail with 500 while `failing`.
    pub fn set_failing(&self, resource: &str, failing: bool) {
        let mut inner = self.shared.inner.lock();
        if failing {
            inner.failing.insert(resource.to_string());
        } else {
            inner.failing.remove(resource);
        }
    }

    /// Requests seen, by `"<verb> <group/plural>"` (verbs: list, watch, get, create, update;
    /// `failed` counts the requests [`FakeApiServer::set_failing`] refused, of any verb).
    pub fn requests(&self, what: &str) -> usize {
        self.shared
            .inner
            .lock()
            .requests
            .get(what)
            .copied()
            .unwrap_or(0)
    }

    /// A bearer token that authenticates as `username` in `groups`.
    pub fn add_token(&self, token: &str, username: &str, groups: &[&str]) {
        self.shared.inner.lock().tokens.insert(
            token.to_string(),
            (
                username.to_string(),
                groups.iter().map(|g| g.to_string()).collect(),
            ),
        );
    }

    /// Lets `username` `get` the non-resource URL `/metrics`.
    pub fn allow_metrics(&self, username: &str) {
        self.shared
            .inner
            .lock()
            .metrics_readers
            .insert(username.to_string());
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(target) = parse_path(uri.path()) else {
        return error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "the server could not find the requested resource",
        );
    };
    if shared.inner.lock().failing.contains(&target.resource) {
        shared.count(format!("failed {}", target.resource));
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "injected failure",
        );
    }
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, &target.name, watching) {
        (&Method::GET, None, true) => "watch",
        (&Method::GET, None, false) => "list",
        (&Method::GET, Some(_), _) => "get",
        (&Method::POST, None, _) => "create",
        (&Method::PUT, Some(_), _) => "update",
        _ => {
            return error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "method not allowed",
            )
        }
    };
    shared.count(format!("{verb} {}", target.resource));
    let body: Value = if body.is_empty() {
        Value::Null
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => return error(StatusCode::BAD_REQUEST, "BadRequest", &e.to_string()),
        }
    };
    match (verb, target.resource.as_str()) {
        ("create", "authentication.k8s.io/tokenreviews") => token_review(&shared, body),
        ("create", "authorization.k8s.io/subjectaccessreviews") => access_review(&shared, body),
        ("watch", _) => watch_response(&shared, &target, &query),
        ("list", _) => list(&shared, &target, &query),
        ("get", _) => {
            let ns = target.namespace.clone().unwrap_or_default();
            let key = (
                target.resource.clone(),
                ns,
                target.name.clone().unwrap_or_default(),
            );
            match shared.inner.lock().objects.get(&key) {
                Some(obj) => reply(StatusCode::OK, obj),
                None => error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    &format!("{} \"{}\" not found", target.resource, key.2),
                ),
            }
        }
        ("create" | "update", _) => {
            let Some(ns) = target.namespace.clone() else {
                return error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "cluster-scoped writes are not supported",
                );
            };
            if verb == "update" && body["metadata"]["name"].as_str() != target.name.as_deref() {
                return error(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "the name of the object does not match the name on the URL",
                );
            }
            match shared.write(&target.resource, &ns, body, verb == "update") {
                Ok(obj) => reply(
                    if verb == "create" {
                        StatusCode::CREATED
                    } else {
                        StatusCode::OK
                    },
                    &obj,
                ),
                Err((code, reason, message)) => error(code, reason, &message),
            }
        }
        _ => error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            "method not allowed",
        ),
    }
}

fn list(shared: &Shared, target: &Target, query: &HashMap<String, String>) -> Response {
    let selectors = Selectors::from_query(query);
    let inner = shared.inner.lock();
    let items: Vec<Value> = inner
        .objects
        .iter()
        .filter(|((res, ns, _), _)| {
            *res == target.resource && target.namespace.as_ref().is_none_or(|t| t == ns)
        })
        .map(|(_, obj)| obj)
        .filter(|obj| selectors.matches(obj))
        .cloned()
        .collect();
    reply(
        StatusCode::OK,
        &json!({"apiVersion": target.api_version, "kind": "List",
                "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items}),
    )
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn watch_response(
    shared: &Arc<Shared>,
    target: &Target,
    query: &HashMap<String, String>,
) -> Response {
    let selectors = Selectors::from_query(query);
    let bookmarks = query
        .get("allowWatchBookmarks")
        .is_some_and(|v| v == "true");
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(1800));
    let since: Option<u64> = query
        .get("resourceVersion")
        .and_then(|s| s.parse().ok())
        .filter(|rv| *rv > 0);
    let namespace = target.namespace.clone();
    let resource = target.resource.clone();
    let api_version = target.api_version.clone();
    let relevant = move |ev: &StoredEvent| {
        ev.resource == resource && namespace.as_ref().is_none_or(|n| *n == ev.namespace)
    };

    let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(256);
    let mut initial = Vec::new();
    let (mut events, mut generation, start_rv) = {
        let inner = shared.inner.lock();
        let expired = since.is_some_and(|rv| rv < inner.oldest_watchable);
        match since {
            Some(rv) if expired => {
                let message = format!(
                    "too old resource version: {rv} ({})",
                    inner.oldest_watchable
                );
                initial.push(event_line("ERROR", &status_body(410, "Expired", &message)));
            }
            Some(rv) => {
                for ev in inner.log.iter().filter(|e| e.rv > rv && relevant(e)) {
                    if let Some((kind, obj)) = selectors.view(ev) {
                        initial.push(event_line(kind.as_str(), &obj));
                    }
                }
            }
            None => {
                // No resourceVersion: synthetic ADDED for everything that exists now.
                for ((res, ns, _), obj) in inner.objects.iter() {
                    let in_scope = *res == target.resource
                        && target.namespace.as_ref().is_none_or(|n| n == ns);
                    if in_scope && selectors.matches(obj) {
                        initial.push(event_line("ADDED", obj));
                    }
                }
            }
        }
        // Subscribed under the lock: every later event has a higher version than the replay.
        let events = (!expired).then(|| shared.events.subscribe());
        (events, shared.generation.subscribe(), inner.rv)
    };
    let kind = kind_of(&target.resource);
    tokio::spawn(async move {
        for line in initial {
            if tx.send(Ok(line)).await.is_err() {
                return;
            }
        }
        let Some(events) = events.as_mut() else {
            return;
        };
        let mut last_rv = start_rv;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut tick = tokio::time::interval(BOOKMARK_EVERY);
        tick.tick().await;
        loop {
            tokio::select! {
                // Biased so an expiry wins over events queued behind it: a compacted watch must
                // not deliver anything newer (the client would resume from it and miss the 410).
                biased;
                _ = generation.changed() => return,
                _ = &mut deadline => return,
                _ = tx.closed() => return,
                ev = events.recv() => match ev {
                    Ok(ev) => {
                        if generation.has_changed().unwrap_or(true) {
                            return;
                        }
                        last_rv = last_rv.max(ev.rv);
                        if !relevant(&ev) {
                            continue;
                        }
                        if let Some((kind, obj)) = selectors.view(&ev) {
                            if tx.send(Ok(event_line(kind.as_str(), &obj))).await.is_err() {
                                return;
                            }
                        }
                    }
                    // Lagging behind: end the watch; the client resumes from its last version.
                    Err(_) => return,
                },
                _ = tick.tick(), if bookmarks => {
                    let bookmark = json!({"apiVersion": api_version, "kind": kind,
                                          "metadata": {"resourceVersion": last_rv.to_string()}});
                    if tx.send(Ok(event_line("BOOKMARK", &bookmark))).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        ))
        .unwrap()
}

/// The kind served under a `group/plural` (for bookmarks).
fn kind_of(resource: &str) -> &'static str {
    match resource.rsplit('/').next().unwrap_or_default() {
        "pods" => "Pod",
        "inferencepools" => "InferencePool",
        "inferenceobjectives" => "InferenceObjective",
        "inferencemodelrewrites" => "InferenceModelRewrite",
        "leases" => "Lease",
        _ => "Unknown",
    }
}

fn token_review(shared: &Shared, body: Value) -> Response {
    let token = body["spec"]["token"].as_str().unwrap_or_default();
    let found = shared.inner.lock().tokens.get(token).cloned();
    let status = match found {
        Some((user, groups)) => json!({"authenticated": true,
            "user": {"username": user, "uid": format!("uid-{user}"), "groups": groups}}),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    reply(
        StatusCode::CREATED,
        &json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "metadata": {}, "spec": body["spec"], "status": status}),
    )
}

fn access_review(shared: &Shared, body: Value) -> Response {
    let spec = &body["spec"];
    let user = spec["user"].as_str().unwrap_or_default();
    let attrs = &spec["nonResourceAttributes"];
    let allowed = attrs["path"] == "/metrics"
        && attrs["verb"] == "get"
        && shared.inner.lock().metrics_readers.contains(user);
    let status = if allowed {
        json!({"allowed": true, "reason": "RBAC: allowed by ClusterRoleBinding \"metrics-reader\""})
    } else {
        json!({"allowed": false})
    };
    reply(
        StatusCode::CREATED,
        &json!({"apiVersion": "authorization.k8s.io/v1", "kind": "SubjectAccessReview",
                "metadata": {}, "spec": spec, "status": status}),
    )
}
