//! The read-only routes: `/api/tags` and `/v1/models` (which models exist), `/api/ps` (which
//! are loaded), `/api/version`.
//!
//! Shapes mirror `api/types.go` (`ListModelResponse`, `ProcessModelResponse`, `ModelDetails`)
//! and `openai/openai.go` (`ListCompletion`, `Model`) in Go's field order. Go's `omitempty`
//! never drops a struct, so `details` is always present; `context_length` in `details` is
//! zero, hence absent.

use serde::Serialize;

use super::gojson;
use super::models::ModelInfo;
use super::response::{ResponseWriter, WriteError};
use super::routes::{Exchange, JSON_UTF8};
use crate::wallclock::{rfc3339_nano, unix_seconds};

/// `api.ModelDetails`.
#[derive(Debug, Serialize)]
struct DetailsJson<'a> {
    parent_model: &'a str,
    format: &'a str,
    family: &'a str,
    families: [&'a str; 1],
    parameter_size: &'a str,
    quantization_level: &'a str,
}

impl<'a> From<&'a ModelInfo> for DetailsJson<'a> {
    fn from(m: &'a ModelInfo) -> Self {
        Self {
            parent_model: "",
            format: m.format,
            family: &m.family,
            families: [&m.family],
            parameter_size: &m.parameter_size,
            quantization_level: m.quantization_level,
        }
    }
}

/// `api.ListModelResponse`.
#[derive(Debug, Serialize)]
struct ListModelJson<'a> {
    name: &'a str,
    model: &'a str,
    modified_at: String,
    size: u64,
    digest: &'a str,
    details: DetailsJson<'a>,
    capabilities: [&'a str; 1],
}

/// `api.ProcessModelResponse`.
#[derive(Debug, Serialize)]
struct ProcessModelJson<'a> {
    name: &'a str,
    model: &'a str,
    size: u64,
    digest: &'a str,
    details: DetailsJson<'a>,
    expires_at: String,
    size_vram: u64,
    context_length: u32,
}

/// `api.ListResponse` and `api.ProcessResponse`.
#[derive(Debug, Serialize)]
struct ModelsJson<T> {
    models: Vec<T>,
}

async fn send_json(w: &mut ResponseWriter<'_>, body: &[u8]) -> Result<(), WriteError> {
    w.send(200, &[("Content-Type", JSON_UTF8.to_owned())], body)
        .await
}

pub async fn tags(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    let models: Vec<ListModelJson> = ex
        .sim
        .models
        .listed()
        .map(|m| ListModelJson {
            name: &m.name,
            model: &m.name,
            modified_at: rfc3339_nano(m.modified_at),
            size: m.size,
            digest: &m.digest,
            details: m.into(),
            capabilities: ["completion"],
        })
        .collect();
    send_json(w, &gojson::marshal(&ModelsJson { models })).await
}

pub async fn ps(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    let loaded = ex.sim.models.loaded();
    let models: Vec<ProcessModelJson> = loaded
        .iter()
        .map(|&(m, expires, context_length)| ProcessModelJson {
            name: &m.name,
            model: &m.name,
            size: m.loaded_size,
            digest: &m.digest,
            details: m.into(),
            expires_at: rfc3339_nano(expires),
            size_vram: m.loaded_size,
            context_length,
        })
        .collect();
    send_json(w, &gojson::marshal(&ModelsJson { models })).await
}

pub async fn version(ex: &Exchange<'_>, w: &mut ResponseWriter<'_>) -> Result<(), WriteError> {
    let version = serde_json::json!({ "version": ex.sim.config.ollama_version });
    send_json(w, &gojson::marshal(&version)).await
}

/// `openai.Model`.
#[derive(Debug, Serialize)]
struct OpenAiModelJson<'a> {
    id: &'a str,
    object: &'a str,
    created: u64,
    owned_by: &'a str,
}

/// `openai.ListCompletion`; Go's nil slice makes an empty list `"data":null`.
#[derive(Debug, Serialize)]
struct OpenAiModelListJson<'a> {
    object: &'a str,
    data: Option<Vec<OpenAiModelJson<'a>>>,
}

/// The namespace of a model name: `library` for Ollama's own models.
fn owner(name: &str) -> &str {
    match name.rsplit_once('/') {
        Some((path, _)) => path.rsplit('/').next().unwrap_or(path),
        None => "library",
    }
}

/// `/v1/models`, written by the middleware's `ListWriter` (plain `application/json`, `Encode`).
pub async fn openai_models(
    ex: &Exchange<'_>,
    w: &mut ResponseWriter<'_>,
) -> Result<(), WriteError> {
    let data: Vec<OpenAiModelJson> = ex
        .sim
        .models
        .listed()
        .map(|m| OpenAiModelJson {
            id: &m.name,
            object: "model",
            created: unix_seconds(m.modified_at),
            owned_by: owner(&m.name),
        })
        .collect();
    let list = OpenAiModelListJson {
        object: "list",
        data: (!data.is_empty()).then_some(data),
    };
    super::openai::send_encoded(w, 200, &list).await
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use super::*;

    #[test]
    fn details_keep_go_field_order() {
        let info = ModelInfo::for_name("qwen2.5:0.5b", SystemTime::UNIX_EPOCH);
        assert_eq!(
            String::from_utf8(gojson::marshal(&DetailsJson::from(&info))).unwrap(),
            r#"{"parent_model":"","format":"gguf","family":"qwen2","families":["qwen2"],"parameter_size":"494.03M","quantization_level":"Q4_K_M"}"#
        );
    }

    #[test]
    fn owners_are_namespaces() {
        assert_eq!(owner("llama3.2:1b"), "library");
        assert_eq!(owner("me/custom:latest"), "me");
        assert_eq!(owner("host.example/team/model:1"), "team");
    }

    #[test]
    fn an_empty_model_list_is_null_like_a_nil_go_slice() {
        let list = OpenAiModelListJson {
            object: "list",
            data: None,
        };
        assert_eq!(
            gojson::marshal(&list),
            br#"{"object":"list","data":null}"#.to_vec()
        );
    }
}
