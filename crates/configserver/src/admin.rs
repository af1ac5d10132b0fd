//! Admin HTTP API (axum): services, one service's providers and consumers,
//! governance rules, health and Prometheus metrics.
//!
//! - `GET /api/services`: `[{service, revision, providers, consumers}]`
//! - `GET /api/services/{key}`: providers and consumers of one service; `key`
//!   is `[group/]interface[:version]` (URL-encode `/` as `%2F` or use it as is)
//! - `GET /api/rules[?service=KEY]`: stored rules `[{service, name, rule, revision, updated_at_ms, updated_by}]`
//! - `GET /api/rule?service=KEY&name=NAME`: one rule
//! - `PUT /api/rule?service=KEY&name=NAME` with the rule's JSON as body:
//!   validated, stored, pushed; `400 {"error", "field"}` names what is wrong
//! - `DELETE /api/rule?service=KEY&name=NAME`
//! - `GET /api/rules/history[?service=KEY][&name=NAME][&limit=N]`: audited
//!   changes, newest first
//!
//! With an admin token configured (see [`crate::auth`]) the rule endpoints,
//! the service listings, `/api/cluster` and `/metrics` need
//! `Authorization: Bearer <token>` (the reads unless `--admin-open-reads`);
//! `/healthz`, `/readyz` and `/api/cluster/servers` never do.
//! `X-Tern-Actor` names who made a change in the audit log (default
//! `admin`).
//! - `GET /healthz`: `ok`
//! - `GET /readyz`: `200 ready` once a cluster member has its peers' data
//!   (at once without peers); `503` naming what it waits for before
//! - `GET /api/cluster`: this server and every member: link state, owned
//!   sessions and instances, replication lag
//! - `GET /api/cluster/servers`: the live members, one `host:port` a line
//!   (an address server's answer; this server alone without peers)
//! - `GET /metrics`: Prometheus text format

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use rpc_core::ServiceKey;
use serde::Deserialize;
use serde_json::{Value, json};
use tern_proto::registry::Instance;

use crate::auth::Credentials;
use crate::governance::{Governance, RuleError};
use crate::peer::Cluster;
use crate::service_map::Registry;
use crate::store::StoredRule;

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub registry: Arc<Registry>,
    pub governance: Arc<Governance>,
    pub credentials: Arc<Credentials>,
    pub cluster: Option<Arc<Cluster>>,
    /// This server's member address (its registry port without peers).
    pub node: String,
    /// With an admin token, the listings and metrics are still open to
    /// anyone (`--admin-open-reads`).
    pub open_reads: bool,
}

impl FromRef<AdminState> for Arc<Registry> {
    fn from_ref(state: &AdminState) -> Arc<Registry> {
        state.registry.clone()
    }
}

pub fn router(state: AdminState) -> Router {
    // What the live map holds, for operators: behind the admin token when
    // there is one, unless opened.
    let reads = Router::new()
        .route("/api/services", get(services))
        .route("/api/services/{*key}", get(service))
        .route("/api/cluster", get(cluster))
        .route("/metrics", get(metrics))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard_reads));
    Router::new()
        .merge(reads)
        .route("/api/rules", get(list_rules))
        .route("/api/rules/history", get(rule_history))
        .route("/api/rule", get(get_rule).put(put_rule).delete(delete_rule))
        // Open: probes, and the address server's list (nodes fetch it with
        // no token; it names only the servers' registry ports).
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/cluster/servers", get(cluster_servers))
        .with_state(state)
}

#[derive(Debug, Deserialize)]
struct RuleQuery {
    service: Option<String>,
    name: Option<String>,
    limit: Option<u32>,
}

fn error(status: StatusCode, message: String, field: Option<&str>) -> Response {
    (status, Json(json!({"error": message, "field": field}))).into_response()
}

/// A request refused before it reached the rules.
#[derive(Debug)]
struct Refused(StatusCode, &'static str);

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        error(self.0, self.1.to_owned(), None)
    }
}

fn rule_error(e: RuleError) -> Response {
    let field = match &e {
        RuleError::Invalid(invalid) => Some(invalid.field.as_str()),
        RuleError::Service(_) => Some("service"),
        RuleError::Name(_) => Some("name"),
        _ => None,
    };
    let status = match &e {
        RuleError::NotFound { .. } => StatusCode::NOT_FOUND,
        RuleError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::BAD_REQUEST,
    };
    error(status, e.to_string(), field)
}

/// The listings and metrics: only with the admin token when one is set,
/// unless they were opened.
async fn guard_reads(
    State(state): State<AdminState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !state.open_reads
        && let Err(refused) = admin_only(&state, request.headers())
    {
        return refused.into_response();
    }
    next.run(request).await
}

/// `Err` unless the request carries the admin token (when one is set).
fn admin_only(state: &AdminState, headers: &HeaderMap) -> Result<(), Refused> {
    let authorization = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    if state.credentials.is_admin(authorization) {
        Ok(())
    } else {
        Err(Refused(
            StatusCode::UNAUTHORIZED,
            "this endpoint needs the admin token (Authorization: Bearer ...)",
        ))
    }
}

/// `service` and `name`, both required.
fn rule_id(query: &RuleQuery) -> Result<(&str, &str), Refused> {
    match (&query.service, &query.name) {
        (Some(service), Some(name)) => Ok((service, name)),
        _ => Err(Refused(
            StatusCode::BAD_REQUEST,
            "query parameters service and name are required",
        )),
    }
}

fn rule_json(rule: &StoredRule) -> Value {
    json!({
        "service": rule.service, "name": rule.name,
        "rule": serde_json::from_str::<Value>(&rule.body).unwrap_or(Value::Null),
        "revision": rule.revision, "updated_at_ms": rule.updated_at_ms, "updated_by": rule.updated_by,
    })
}

async fn list_rules(State(state): State<AdminState>, headers: HeaderMap, Query(query): Query<RuleQuery>) -> Response {
    if let Err(refused) = admin_only(&state, &headers) {
        return refused.into_response();
    }
    match state.governance.list(query.service.as_deref()).await {
        Ok(rules) => Json(rules.iter().map(rule_json).collect::<Vec<_>>()).into_response(),
        Err(e) => rule_error(e),
    }
}

async fn get_rule(State(state): State<AdminState>, headers: HeaderMap, Query(query): Query<RuleQuery>) -> Response {
    let (service, name) = match admin_only(&state, &headers).and_then(|()| rule_id(&query)) {
        Ok(id) => id,
        Err(refused) => return refused.into_response(),
    };
    match state.governance.get(service, name).await {
        Ok(rule) => Json(rule_json(&rule)).into_response(),
        Err(e) => rule_error(e),
    }
}

fn actor(headers: &HeaderMap) -> String {
    headers
        .get("x-tern-actor")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .unwrap_or("admin")
        .to_owned()
}

async fn put_rule(
    State(state): State<AdminState>,
    headers: HeaderMap,
    Query(query): Query<RuleQuery>,
    body: String,
) -> Response {
    let (service, name) = match admin_only(&state, &headers).and_then(|()| rule_id(&query)) {
        Ok(id) => id,
        Err(refused) => return refused.into_response(),
    };
    match state.governance.put(service, name, &body, &actor(&headers)).await {
        Ok(rule) => Json(rule_json(&rule)).into_response(),
        Err(e) => rule_error(e),
    }
}

async fn delete_rule(State(state): State<AdminState>, headers: HeaderMap, Query(query): Query<RuleQuery>) -> Response {
    let (service, name) = match admin_only(&state, &headers).and_then(|()| rule_id(&query)) {
        Ok(id) => id,
        Err(refused) => return refused.into_response(),
    };
    match state.governance.delete(service, name, &actor(&headers)).await {
        Ok(revision) => Json(json!({"deleted": name, "revision": revision})).into_response(),
        Err(e) => rule_error(e),
    }
}

async fn rule_history(State(state): State<AdminState>, headers: HeaderMap, Query(query): Query<RuleQuery>) -> Response {
    if let Err(refused) = admin_only(&state, &headers) {
        return refused.into_response();
    }
    let limit = query.limit.unwrap_or(100).min(10_000);
    match state
        .governance
        .history(query.service.as_deref(), query.name.as_deref(), limit)
        .await
    {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => rule_error(e),
    }
}

async fn services(State(registry): State<Arc<Registry>>) -> Json<Value> {
    let services: Vec<Value> = registry
        .overview()
        .into_iter()
        .map(|(key, revision, providers, consumers)| {
            json!({"service": key.to_string(), "revision": revision, "providers": providers, "consumers": consumers})
        })
        .collect();
    Json(Value::Array(services))
}

fn instance_json(i: &Instance) -> Value {
    json!({
        "address": rpc_core::registry::convert::instance_addr(i),
        "weight": i.weight, "zone": i.zone, "app": i.app, "protocol": i.protocol,
        "start_time_ms": i.start_time_ms, "metadata": i.metadata,
    })
}

async fn service(State(state): State<AdminState>, Path(key): Path<String>) -> Response {
    let registry = &state.registry;
    let server = |peer: &Option<String>| peer.clone().unwrap_or_else(|| state.node.clone());
    let key: ServiceKey = match key.parse() {
        Ok(key) => key,
        Err(e) => return (StatusCode::BAD_REQUEST, Json(json!({"error": e.to_string()}))).into_response(),
    };
    match registry.detail(&key) {
        None => (
            StatusCode::NOT_FOUND,
            Json(json!({"error": format!("no service {key}")})),
        )
            .into_response(),
        Some(detail) => Json(json!({
            "service": key.to_string(),
            "revision": detail.revision,
            "providers": detail.providers.iter().map(|(i, peer)| {
                let mut json = instance_json(i);
                json["server"] = Value::from(server(peer));
                json
            }).collect::<Vec<_>>(),
            "consumers": detail.consumers.iter().map(|(c, peer)| json!({
                "app": c.app, "host": c.host, "zone": c.zone,
                "peer": c.peer.map(|p| p.to_string()),
                "server": server(peer),
            })).collect::<Vec<_>>(),
        }))
        .into_response(),
    }
}

async fn metrics(State(registry): State<Arc<Registry>>) -> String {
    let (sessions, services, providers, subscriptions) = registry.counts();
    registry.metrics.render(&[
        ("configserver_sessions", "Live sessions", sessions as u64),
        ("configserver_services", "Services known", services as u64),
        (
            "configserver_providers",
            "Registered provider instances",
            providers as u64,
        ),
        ("configserver_subscriptions", "Live subscriptions", subscriptions as u64),
        (
            "configserver_connections",
            "Connections open on the registry port",
            registry.metrics.connections_open.load(Ordering::Relaxed),
        ),
    ])
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match &state.cluster {
        Some(cluster) if !cluster.is_ready() => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("syncing: waiting for {}\n", cluster.waiting_for().join(", ")),
        )
            .into_response(),
        _ => "ready\n".into_response(),
    }
}

async fn cluster_servers(State(state): State<AdminState>) -> String {
    let members = match &state.cluster {
        Some(cluster) => cluster.live_members(),
        None => vec![state.node.clone()],
    };
    members.iter().map(|m| format!("{m}\n")).collect()
}

async fn cluster(State(state): State<AdminState>) -> Json<Value> {
    let registry = &state.registry;
    let (sessions, providers) = registry.owned();
    let this = json!({
        "node": state.node, "epoch": registry.epoch(), "self": true,
        "state": match &state.cluster {
            Some(c) if !c.is_ready() => "syncing",
            _ => "ready",
        },
        "sessions": sessions, "instances": providers,
    });
    let Some(cluster) = &state.cluster else {
        return Json(json!({"node": state.node, "members": [this]}));
    };
    let replicas = registry.replicas();
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    let mut members = vec![this];
    for (name, link) in cluster.links() {
        let copies: Vec<Value> = replicas
            .iter()
            .filter(|r| r.node == name)
            .map(|r| {
                json!({
                    "epoch": r.epoch, "admin": r.admin, "connected": r.connected, "synced": r.synced,
                    "orphaned_ms": r.orphaned_for.map(ms), "seq": r.seq,
                    "sessions": r.sessions, "instances": r.providers, "consumers": r.consumers,
                    "replication_lag_ms": r.last_lag_ms, "last_applied_ms_ago": r.last_applied_ago.map(ms),
                })
            })
            .collect();
        let live = copies.iter().any(|c| c["connected"] == true);
        members.push(json!({
            "node": name,
            "state": if link.connected && live { "up" } else if link.connected || live { "half-up" } else { "down" },
            "link": {
                "connected": link.connected, "for_ms": link.since.map(|s| ms(s.elapsed())),
                "attempts": link.attempts, "last_error": link.last_error,
                "batches": link.batches, "full_copies": link.fulls, "bytes": link.bytes,
            },
            "copies": copies,
        }));
    }
    Json(json!({"node": state.node, "ready": cluster.is_ready(), "members": members}))
}
