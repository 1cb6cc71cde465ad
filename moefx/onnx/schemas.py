"""The ``com.microsoft.MoE`` operator schema, so that onnxscript can emit the op and onnx.checker can check it.

onnxscript only builds nodes for operators whose ``onnx.defs.OpSchema`` is registered; ONNX Runtime's contrib
ops are not in the ``onnx`` package. :func:`ort_moe_opset` registers a schema that mirrors ONNX Runtime's
(inputs, attributes and type constraint as ``onnxruntime`` 1.32 declares them) once per process, and returns
the ``com.microsoft`` opset to call it through.
"""

from __future__ import annotations

import onnx
import onnxscript

__all__ = ["MOEFX_DOMAIN", "MOEFX_DOMAIN_VERSION", "MS_DOMAIN", "ORT_MOE_ATTRIBUTES", "ORT_MOE_INPUTS",
           "moefx_function_opset", "ort_moe_opset"]

MS_DOMAIN = "com.microsoft"

#: Attributes of ``com.microsoft.MoE`` (name -> ONNX attribute type), as ONNX Runtime declares them.
ORT_MOE_ATTRIBUTES: dict[str, str] = {
    "k": "INT",
    "activation_type": "STRING",
    "normalize_routing_weights": "INT",
    "use_sparse_mixer": "INT",
    "swiglu_fusion": "INT",
    "swiglu_limit": "FLOAT",
    "swiglu_limit_after_activation": "INT",
    "activation_alpha": "FLOAT",
    "activation_beta": "FLOAT",
}

#: Inputs of ``com.microsoft.MoE`` in order; all but the first three and the fifth are optional.
ORT_MOE_INPUTS = (
    "input",
    "router_probs",
    "fc1_experts_weights",
    "fc1_experts_bias",
    "fc2_experts_weights",
    "fc2_experts_bias",
    "fc3_experts_weights",
    "fc3_experts_bias",
)
_REQUIRED_INPUTS = {"input", "router_probs", "fc1_experts_weights", "fc2_experts_weights"}


def _moe_schema() -> onnx.defs.OpSchema:
    schema = onnx.defs.OpSchema
    optional = schema.FormalParameterOption.Optional
    inputs = [
        schema.FormalParameter(name, "T") if name in _REQUIRED_INPUTS else
        schema.FormalParameter(name, "T", param_option=optional)
        for name in ORT_MOE_INPUTS
    ]
    attributes = [
        schema.Attribute(name, getattr(schema.AttrType, kind), "", required=False)
        for name, kind in ORT_MOE_ATTRIBUTES.items()
    ]
    return schema(
        "MoE",
        MS_DOMAIN,
        1,
        doc="Mixture of experts (ONNX Runtime contrib op): softmax(router_probs), top k, expert FFNs, weighted sum.",
        inputs=inputs,
        outputs=[schema.FormalParameter("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
        attributes=attributes,
    )


def ort_moe_opset() -> onnxscript.values.Opset:
    """The ``com.microsoft`` opset (version 1), with the ``MoE`` schema registered in this process."""
    if not onnx.defs.has("MoE", 1, MS_DOMAIN):
        onnx.defs.register_schema(_moe_schema())
    return onnxscript.values.Opset(MS_DOMAIN, 1)


MOEFX_DOMAIN = "moefx"
MOEFX_DOMAIN_VERSION = 1


def moefx_function_opset(name: str, inputs: list[str]) -> onnxscript.values.Opset:
    """The ``moefx`` opset (version 1), with a schema for the local function ``name(*inputs) -> output``.

    onnxscript only builds nodes for registered schemas; the node's meaning comes from the FunctionProto that
    the export adds to the model (ONNX Runtime inlines it), so the schema only names the inputs.
    """
    if not onnx.defs.has(name, MOEFX_DOMAIN_VERSION, MOEFX_DOMAIN):
        schema = onnx.defs.OpSchema
        types = {"x": "T", "expert_index": "I", "combine_weight": "W"}
        onnx.defs.register_schema(schema(
            name,
            MOEFX_DOMAIN,
            MOEFX_DOMAIN_VERSION,
            doc="moefx expert FFNs for a given assignment (a model-local ONNX function).",
            inputs=[schema.FormalParameter(i, types.get(i, "T")) for i in inputs],
            outputs=[schema.FormalParameter("output", "T")],
            type_constraints=[
                ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "float tensors"),
                ("W", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)", "tensor(double)"], "weights"),
                ("I", ["tensor(int64)", "tensor(int32)"], "expert indices"),
            ],
        ))
    return onnxscript.values.Opset(MOEFX_DOMAIN, MOEFX_DOMAIN_VERSION)
