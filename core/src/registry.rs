//! The registry of known kinds: each factory behind one object-safe interface, so the config
//! loader parses a component's YAML node with its kind's config type and the runtime builds it.

use std::any::Any;
use std::collections::BTreeMap;
use std::sync::Arc;

use crate::component::{
    BuildContext, ComponentConfig, ComponentError, Exporter, ExporterFactory, Processor,
    ProcessorFactory, Receiver, ReceiverFactory,
};
use crate::config::exporter::ExporterSettings;
use crate::config::node::{DeError, Node};
use crate::id::{ComponentId, ComponentKind};

/// A parsed, validated config whose concrete type only its factory knows.
pub(crate) type AnyConfig = Box<dyn Any + Send>;

/// What the registry keeps of a factory: its config type erased behind `parse`.
pub(crate) trait DynFactory<T: ?Sized>: Send + Sync {
    fn kind(&self) -> &'static str;
    fn description(&self) -> &'static str;
    fn parse(&self, node: &Node) -> Result<AnyConfig, DeError>;
    fn build(&self, config: &mut AnyConfig, ctx: &BuildContext) -> Result<Box<T>, ComponentError>;
    /// Exporters: [`ExporterFactory::build_with_settings`].
    fn build_with_settings(
        &self,
        config: &mut AnyConfig,
        ctx: &BuildContext,
        settings: &ExporterSettings,
    ) -> Result<Box<T>, ComponentError> {
        let _ = settings;
        self.build(config, ctx)
    }
}

fn parse_config<C: ComponentConfig>(node: &Node) -> Result<AnyConfig, DeError> {
    let config: C = node.deserialize()?;
    config.validate().map_err(|e| {
        let pos = e
            .field
            .as_deref()
            .and_then(|f| node.key_node(f))
            .map_or(node.pos, |k| k.pos);
        let message = match e.field {
            Some(f) => format!("`{f}`: {}", e.message),
            None => e.message,
        };
        DeError::at(message, pos)
    })?;
    Ok(Box::new(Some(config)))
}

// Receivers and exporters are built once and take their config by value; processors are
// built once per pipeline and borrow it.
fn take_config<C: 'static>(config: &mut AnyConfig) -> Result<C, ComponentError> {
    config
        .downcast_mut::<Option<C>>()
        .and_then(Option::take)
        .ok_or_else(|| ComponentError::Config("config already consumed".into()))
}

struct Erased<F>(F);

impl<F: ReceiverFactory> DynFactory<dyn Receiver> for Erased<F> {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn description(&self) -> &'static str {
        self.0.description()
    }
    fn parse(&self, node: &Node) -> Result<AnyConfig, DeError> {
        parse_config::<F::Config>(node)
    }
    fn build(
        &self,
        config: &mut AnyConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Receiver>, ComponentError> {
        self.0.build(take_config(config)?, ctx)
    }
}

impl<F: ProcessorFactory> DynFactory<dyn Processor> for Erased<F> {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn description(&self) -> &'static str {
        self.0.description()
    }
    fn parse(&self, node: &Node) -> Result<AnyConfig, DeError> {
        parse_config::<F::Config>(node)
    }
    fn build(
        &self,
        config: &mut AnyConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Processor>, ComponentError> {
        let config = config
            .downcast_ref::<Option<F::Config>>()
            .and_then(Option::as_ref)
            .ok_or_else(|| ComponentError::Config("config of the wrong type".into()))?;
        self.0.build(config, ctx)
    }
}

impl<F: ExporterFactory> DynFactory<dyn Exporter> for Erased<F> {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }
    fn description(&self) -> &'static str {
        self.0.description()
    }
    fn parse(&self, node: &Node) -> Result<AnyConfig, DeError> {
        parse_config::<F::Config>(node)
    }
    fn build(
        &self,
        config: &mut AnyConfig,
        ctx: &BuildContext,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        self.0.build(take_config(config)?, ctx)
    }
    fn build_with_settings(
        &self,
        config: &mut AnyConfig,
        ctx: &BuildContext,
        settings: &ExporterSettings,
    ) -> Result<Box<dyn Exporter>, ComponentError> {
        self.0
            .build_with_settings(take_config(config)?, ctx, settings)
    }
}

type Registry<T> = BTreeMap<&'static str, Arc<dyn DynFactory<T>>>;

/// The component kinds a collector binary knows. The binary's `builtin()` fills it; a custom
/// build adds its own with `with_receiver` and friends.
#[derive(Clone, Default)]
pub struct Components {
    pub(crate) receivers: Registry<dyn Receiver>,
    pub(crate) processors: Registry<dyn Processor>,
    pub(crate) exporters: Registry<dyn Exporter>,
}

/// One registered kind, as `genai-collector components` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KindInfo {
    /// Receiver, processor or exporter.
    pub kind: ComponentKind,
    /// The kind's name in the config.
    pub name: &'static str,
    /// Its factory's one-line description.
    pub description: &'static str,
}

impl Components {
    /// No kinds at all; the binary's `Components::builtin()` has every built-in one.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a receiver kind; a later registration of the same kind replaces the earlier.
    pub fn with_receiver(mut self, factory: impl ReceiverFactory) -> Self {
        self.receivers
            .insert(factory.kind(), Arc::new(Erased(factory)));
        self
    }

    /// Registers a processor kind; a later registration of the same kind replaces the earlier.
    pub fn with_processor(mut self, factory: impl ProcessorFactory) -> Self {
        self.processors
            .insert(factory.kind(), Arc::new(Erased(factory)));
        self
    }

    /// Registers an exporter kind; a later registration of the same kind replaces the earlier.
    pub fn with_exporter(mut self, factory: impl ExporterFactory) -> Self {
        self.exporters
            .insert(factory.kind(), Arc::new(Erased(factory)));
        self
    }

    /// Every registered kind, receivers first, each group sorted by name.
    pub fn list(&self) -> Vec<KindInfo> {
        fn infos<T: ?Sized>(
            kind: ComponentKind,
            r: &Registry<T>,
        ) -> impl Iterator<Item = KindInfo> + '_ {
            r.values().map(move |f| KindInfo {
                kind,
                name: f.kind(),
                description: f.description(),
            })
        }
        infos(ComponentKind::Receiver, &self.receivers)
            .chain(infos(ComponentKind::Processor, &self.processors))
            .chain(infos(ComponentKind::Exporter, &self.exporters))
            .collect()
    }

    pub(crate) fn kind_names(&self, kind: ComponentKind) -> Vec<&'static str> {
        match kind {
            ComponentKind::Receiver => self.receivers.keys().copied().collect(),
            ComponentKind::Processor => self.processors.keys().copied().collect(),
            ComponentKind::Exporter => self.exporters.keys().copied().collect(),
        }
    }

    pub(crate) fn parse(
        &self,
        kind: ComponentKind,
        id: &ComponentId,
        node: &Node,
    ) -> Option<Result<AnyConfig, DeError>> {
        let name = id.kind();
        Some(match kind {
            ComponentKind::Receiver => self.receivers.get(name)?.parse(node),
            ComponentKind::Processor => self.processors.get(name)?.parse(node),
            ComponentKind::Exporter => self.exporters.get(name)?.parse(node),
        })
    }
}
