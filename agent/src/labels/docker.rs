//! Container labels from the Docker Engine API over its unix socket.
//!
//! One `GET /containers/{id}/json` per container; the reply's `Name` and `Config.Labels` are all
//! that is read. The request carries no API version in its path, so the engine answers with its
//! own current version, whose `Name` and `Config.Labels` have kept their shape since Engine API
//! 1.12.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::UnixStream;

use super::{ContainerMetadata, LabelError, LabelSource, LookupFuture};
use crate::state::container::Runtime;

/// Largest reply body read; an inspect reply is a few KiB, so more means a broken peer.
const MAX_REPLY_BYTES: usize = 1 << 20;

/// The Docker Engine on one unix socket.
#[derive(Debug, Clone)]
pub struct DockerSource {
    socket: PathBuf,
}

#[derive(Deserialize)]
struct InspectReply {
    #[serde(rename = "Name", default)]
    name: String,
    #[serde(rename = "Config", default)]
    config: Option<InspectConfig>,
}

#[derive(Deserialize)]
struct InspectConfig {
    // Docker sends `null` for a container created without labels.
    #[serde(rename = "Labels", default)]
    labels: Option<BTreeMap<String, String>>,
}

impl DockerSource {
    pub fn new(socket: PathBuf) -> DockerSource {
        DockerSource { socket }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn inspect(&self, container_id: &str) -> Result<Option<ContainerMetadata>, LabelError> {
        let stream = UnixStream::connect(&self.socket)
            .await
            .map_err(|source| LabelError::Connect { socket: self.socket.clone(), source })?;
        let request_error = |error: hyper::Error| LabelError::Request {
            socket: self.socket.clone(),
            reason: error.to_string(),
        };
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(request_error)?;
        // The connection task ends when the reply is read and `sender` is dropped.
        let connection = tokio::spawn(connection);

        let request = hyper::Request::get(format!("/containers/{container_id}/json"))
            .header(hyper::header::HOST, "docker")
            .body(Empty::<Bytes>::new())
            .map_err(|error| LabelError::Request { socket: self.socket.clone(), reason: error.to_string() })?;
        let response = sender.send_request(request).await.map_err(request_error)?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_REPLY_BYTES)
            .collect()
            .await
            .map_err(|error| LabelError::Request { socket: self.socket.clone(), reason: error.to_string() })?
            .to_bytes();
        drop(sender);
        connection.abort();

        if status == hyper::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(LabelError::Status {
                socket: self.socket.clone(),
                status: status.as_u16(),
                container_id: container_id.to_string(),
            });
        }
        let reply: InspectReply = serde_json::from_slice(&body).map_err(|error| LabelError::InvalidReply {
            socket: self.socket.clone(),
            container_id: container_id.to_string(),
            reason: error.to_string(),
        })?;
        Ok(Some(ContainerMetadata {
            name: reply.name.trim_start_matches('/').to_string(),
            labels: reply.config.and_then(|config| config.labels).unwrap_or_default(),
            pod: None,
        }))
    }
}

impl LabelSource for DockerSource {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn serves(&self, runtime: Runtime) -> bool {
        runtime == Runtime::Docker
    }

    fn lookup<'a>(&'a self, container_id: &'a str) -> LookupFuture<'a> {
        Box::pin(self.inspect(container_id))
    }
}
