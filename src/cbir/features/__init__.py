"""Descriptors: registered plug-ins that turn images into vectors."""

from cbir.features.base import DerivedDescriptor, Descriptor, DescriptorUnavailableError
from cbir.features.registry import (
    create_descriptor,
    describe_descriptors,
    descriptor_names,
    format_spec,
    get_descriptor_class,
    metric_applies,
    metrics_for,
    parse_spec,
    register_descriptor,
)

__all__ = [
    "DerivedDescriptor",
    "Descriptor",
    "DescriptorUnavailableError",
    "create_descriptor",
    "describe_descriptors",
    "descriptor_names",
    "format_spec",
    "get_descriptor_class",
    "metric_applies",
    "metrics_for",
    "parse_spec",
    "register_descriptor",
]
