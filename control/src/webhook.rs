//! Rollout webhooks: a gate asked before each step (non-2xx holds the step)
//! and notifications of step changes, promotion, rollback, pause and abort.
//! Plain HTTP (the receivers are in-cluster services), bounded by a timeout per
//! attempt and a retry count.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Dur;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Webhooks {
    /// Asked before every step; a non-2xx answer (or none) holds the step.
    #[serde(default)]
    pub gate: Option<String>,
    /// Told about step changes, promotion, rollback, pause and abort.
    #[serde(default)]
    pub notify: Vec<String>,
    /// Per attempt. Default `5s`.
    #[serde(default = "d_timeout")]
    pub timeout: Dur,
    /// Further attempts after a failed one. Default 2.
    #[serde(default = "d_retries")]
    pub retries: u32,
}

fn d_timeout() -> Dur {
    Dur(Duration::from_secs(5))
}
fn d_retries() -> u32 {
    2
}

impl Default for Webhooks {
    fn default() -> Self {
        Self {
            gate: None,
            notify: Vec::new(),
            timeout: d_timeout(),
            retries: d_retries(),
        }
    }
}

impl Webhooks {
    /// Every URL must be `http://host[:port]/...`.
    pub fn validate(&self) -> Result<(), String> {
        for url in self.gate.iter().chain(&self.notify) {
            let uri: http::Uri = url.parse().map_err(|_| format!("`{url}` is not a URL"))?;
            if uri.scheme_str() != Some("http") || uri.host().is_none() {
                return Err(format!("`{url}` must be an http:// URL"));
            }
        }
        if self.timeout.0.is_zero() || self.timeout.0 > Duration::from_secs(60) {
            return Err("timeout must be between 1ms and 60s".into());
        }
        if self.retries > 10 {
            return Err("retries must be at most 10".into());
        }
        Ok(())
    }

    /// Asks the gate; `Ok` when there is none or it answered 2xx.
    pub async fn gate(&self, payload: &Value) -> Result<(), String> {
        match &self.gate {
            None => Ok(()),
            Some(url) => self.post(url, payload).await,
        }
    }

    /// Tells every notify URL, in the background.
    pub fn notify(&self, payload: Value) {
        for url in self.notify.clone() {
            let hooks = self.clone();
            let payload = payload.clone();
            tokio::spawn(async move {
                if let Err(e) = hooks.post(&url, &payload).await {
                    tracing::warn!(url = %url, error = %e, "rollout notification not delivered");
                }
            });
        }
    }

    async fn post(&self, url: &str, payload: &Value) -> Result<(), String> {
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let body = Bytes::from(payload.to_string());
        let mut last = String::new();
        for attempt in 0..=self.retries {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
            }
            let req = Request::post(url)
                .header("content-type", "application/json")
                .body(Full::new(body.clone()))
                .map_err(|e| e.to_string())?;
            match tokio::time::timeout(self.timeout.0, client.request(req)).await {
                Ok(Ok(resp)) if resp.status().is_success() => return Ok(()),
                Ok(Ok(resp)) => last = format!("{url} answered {}", resp.status().as_u16()),
                Ok(Err(e)) => last = format!("{url}: {e}"),
                Err(_) => {
                    last = format!(
                        "{url}: no answer within {}",
                        humantime::format_duration(self.timeout.0)
                    )
                }
            }
        }
        Err(last)
    }
}
