//! JSON Schemas of the files operators write (`gateway schema`), generated
//! from the types they are parsed into, so they cannot drift apart.
//!
//! Draft 7, which editors (yaml-language-server) support best. The
//! committed copies live in docs/schema/; a test keeps them equal to these.

use schemars::JsonSchema;
use schemars::generate::SchemaSettings;
use serde_json::Value;

use super::types::{ChannelFile, GatewayFile};

/// Which file a schema describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchemaKind {
    /// `gateway.yaml`.
    Gateway,
    /// A channel spec file.
    Channel,
}

impl SchemaKind {
    /// The file name of the committed copy in docs/schema/.
    pub fn file_name(self) -> &'static str {
        match self {
            SchemaKind::Gateway => "gateway.schema.json",
            SchemaKind::Channel => "channel-spec.schema.json",
        }
    }
}

fn generate<T: JsonSchema>(title: &str, description: &str) -> Value {
    let schema = SchemaSettings::draft07()
        .into_generator()
        .into_root_schema_for::<T>();
    let mut v = schema.to_value();
    if let Value::Object(m) = &mut v {
        m.insert("title".into(), title.into());
        m.insert("description".into(), description.into());
    }
    v
}

/// The JSON Schema of `kind`.
pub fn json_schema(kind: SchemaKind) -> Value {
    match kind {
        SchemaKind::Gateway => generate::<GatewayFile>(
            "gateway.yaml",
            "The gateway's process-wide settings: listeners, plugin directories, channel spec files, admin routes, limits, protocols, endpoints and HTTP routes. Every key is documented in docs/configuration.md.",
        ),
        SchemaKind::Channel => generate::<ChannelFile>(
            "channel spec",
            "One channel: its name, JSON Schema, source plugin, endpoints and options. Every key is documented in docs/configuration.md#channel-specs.",
        ),
    }
}

/// [`json_schema`] as `gateway schema` prints it: pretty JSON and a newline.
pub fn render(kind: SchemaKind) -> String {
    let mut s = serde_json::to_string_pretty(&json_schema(kind)).unwrap_or_default();
    s.push('\n');
    s
}
