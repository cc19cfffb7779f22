//! Reading the layers (defaults, files, `CHATD_*` variables, flags) and merging them into one
//! [`Config`], each layer checked on its own so that an error names where it came from.

use std::path::Path;

use serde::Deserialize;

use super::{Config, ConfigError, Sources};

const ENV_PREFIX: &str = "CHATD_";

impl Config {
    /// Loads and validates every layer.
    pub fn load(sources: &Sources) -> Result<Config, ConfigError> {
        let mut merged = toml::Table::new();

        let default_path = sources.config_dir.join("default.toml");
        if default_path.exists() {
            merge(&mut merged, read_layer(&default_path)?);
        }
        if let Some(profile) = &sources.profile {
            if profile.is_empty()
                || !profile
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(ConfigError::Invalid {
                    origin: "--profile".into(),
                    detail: format!("{profile:?} is not a profile name (letters, digits, - and _)"),
                });
            }
            let path = sources.config_dir.join(format!("{profile}.toml"));
            if !path.exists() {
                return Err(ConfigError::MissingProfile {
                    profile: profile.clone(),
                    path,
                });
            }
            merge(&mut merged, read_layer(&path)?);
        }
        if let Some(path) = &sources.file {
            merge(&mut merged, read_layer(path)?);
        }
        for (name, value) in &sources.env {
            if let Some(layer) = env_layer(name, value)? {
                merge(&mut merged, layer);
            }
        }

        let mut config =
            Config::deserialize(toml::Value::Table(merged)).map_err(|e| ConfigError::Invalid {
                origin: "merged configuration".into(),
                detail: e.to_string(),
            })?;
        if let Some(port) = sources.overrides.port {
            config.server.port = port;
        }
        if let Some(node_id) = &sources.overrides.node_id {
            config.server.node_id = node_id.clone();
        }
        if config.server.node_id.is_empty() {
            config.server.node_id = default_node_id(config.server.port);
        }
        config.validate()?;
        Ok(config)
    }
}

/// The process environment's `CHATD_*` variables, in a stable order.
pub fn chatd_env() -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with(ENV_PREFIX))
        .collect();
    vars.sort();
    vars
}

fn default_node_id(port: u16) -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "chatd".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        .take(50)
        .collect();
    format!("{host}-{port}")
}

fn read_layer(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |e: toml::de::Error| ConfigError::Invalid {
        origin: path.display().to_string(),
        detail: e.to_string().trim_end().to_string(),
    };
    // Parsing into `Config` first gives errors with line, column and the offending key.
    toml::from_str::<Config>(&text).map_err(invalid)?;
    toml::from_str::<toml::Table>(&text).map_err(invalid)
}

/// One `CHATD_<SECTION>__<KEY>` variable as a layer. The value is read as a TOML value
/// (`9500`, `true`, `["a","b"]`) and, when that does not fit the key, as a plain string.
fn env_layer(name: &str, value: &str) -> Result<Option<toml::Table>, ConfigError> {
    let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
        return Ok(None);
    };
    let invalid = |detail: String| ConfigError::Invalid {
        origin: format!("environment variable {name}"),
        detail,
    };
    let Some((section, key)) = rest.split_once("__") else {
        // Not meant for us: Kubernetes injects CHATD_SERVICE_HOST, CHATD_PORT=tcp://... for
        // a Service named chatd, and scripts set things like CHATD_BIN. Only a name of the
        // form CHATD_<SECTION>__<KEY> is a setting (and a mistyped one stays an error).
        tracing::debug!(
            variable = name,
            "not a CHATD_<SECTION>__<KEY> setting; ignored"
        );
        return Ok(None);
    };
    let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
    if let ("kafka", Some(property)) = (section.as_str(), key.strip_prefix("properties__")) {
        // librdkafka's names are dotted words; a variable's name cannot hold a dot.
        let mut properties = toml::Table::new();
        properties.insert(
            property.replace('_', "."),
            toml::Value::String(value.to_string()),
        );
        let mut kafka = toml::Table::new();
        kafka.insert("properties".into(), toml::Value::Table(properties));
        let mut outer = toml::Table::new();
        outer.insert(section, toml::Value::Table(kafka));
        return Ok(Some(outer));
    }
    let layer_with = |v: toml::Value| {
        let mut inner = toml::Table::new();
        inner.insert(key.clone(), v);
        let mut outer = toml::Table::new();
        outer.insert(section.clone(), toml::Value::Table(inner));
        outer
    };
    let check = |t: &toml::Table| Config::deserialize(toml::Value::Table(t.clone()));

    let as_string = layer_with(toml::Value::String(value.to_string()));
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .map(layer_with);
    if let Some(parsed) = parsed {
        match check(&parsed) {
            Ok(_) => return Ok(Some(parsed)),
            Err(first) => {
                return match check(&as_string) {
                    Ok(_) => Ok(Some(as_string)),
                    Err(_) => Err(invalid(first.to_string())),
                }
            }
        }
    }
    check(&as_string).map_err(|e| invalid(e.to_string()))?;
    Ok(Some(as_string))
}

/// Deep-merges `upper` into `base`: tables merge key by key, anything else is replaced.
/// Lays `upper` over `base`. Kafka properties are made flat first (`security.protocol` as
/// one key, however the layer wrote it), so that a later layer's property replaces an
/// earlier one's.
fn merge(base: &mut toml::Table, mut upper: toml::Table) {
    fn flatten(prefix: &str, table: toml::Table, out: &mut toml::Table) {
        for (key, value) in table {
            let name = format!("{prefix}{key}");
            match value {
                toml::Value::Table(t) => flatten(&format!("{name}."), t, out),
                v => {
                    out.insert(name, v);
                }
            }
        }
    }
    if let Some(toml::Value::Table(kafka)) = upper.get_mut("kafka") {
        if let Some(toml::Value::Table(properties)) = kafka.remove("properties") {
            let mut flat = toml::Table::new();
            flatten("", properties, &mut flat);
            kafka.insert("properties".into(), toml::Value::Table(flat));
        }
    }
    merge_tables(base, upper);
}

fn merge_tables(base: &mut toml::Table, upper: toml::Table) {
    for (key, value) in upper {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(u)) => merge_tables(b, u),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}
