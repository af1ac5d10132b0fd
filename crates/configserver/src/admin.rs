//! Admin HTTP API (axum): services, one service's providers and consumers,
//! health and Prometheus metrics.
//!
//! - `GET /api/services`: `[{service, revision, providers, consumers}]`
//! - `GET /api/services/{key}`: providers and consumers of one service; `key`
//!   is `[group/]interface[:version]` (URL-encode `/` as `%2F` or use it as is)
//! - `GET /healthz`: `ok`
//! - `GET /metrics`: Prometheus text format

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use rpc_core::ServiceKey;
use serde_json::{Value, json};
use tern_proto::registry::Instance;

use crate::registry::Registry;

pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/api/services", get(services))
        .route("/api/services/{*key}", get(service))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(registry)
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

async fn service(State(registry): State<Arc<Registry>>, Path(key): Path<String>) -> Response {
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
        Some((revision, providers, consumers)) => Json(json!({
            "service": key.to_string(),
            "revision": revision,
            "providers": providers.iter().map(instance_json).collect::<Vec<_>>(),
            "consumers": consumers.iter().map(|c| json!({
                "app": c.app, "host": c.host, "zone": c.zone,
                "peer": c.peer.map(|p| p.to_string()),
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
    ])
}
