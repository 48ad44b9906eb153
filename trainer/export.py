"""Export a Keras model to ONNX (tf2onnx, opset 17) with fused LayerNorm/GELU and a parity check."""
from __future__ import annotations

import sys

import numpy as np
from tf2onnx import utils
from tf2onnx.handler import tf_op

from . import files


@tf_op("Erfc")
class ErfcHandler:
    """Exact GELU becomes TF's Erfc, which tf2onnx lacks: erfc(x) = 1 - erf(x)."""

    @classmethod
    def version_9(cls, ctx, node, **kwargs):
        node.type = "Erf"
        dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
        one = ctx.make_const(utils.make_name("erfc_one"), np.array(1, dtype))
        neg = ctx.insert_new_node_on_output("Neg", node.output[0], name=utils.make_name(node.name + "_neg"))
        ctx.insert_new_node_on_output("Add", neg.output[0], name=utils.make_name(node.name + "_add"),
                                      inputs=[neg.output[0], one.output[0]])


class ExportError(RuntimeError):
    """The exported model does not match the Keras model; nothing was written."""


# ---- graph rewrites: tf2onnx spells LayerNorm and GELU as dozens of small ops --------------------------

class _Graph:
    """Producer/consumer maps and constants of an ONNX graph, for pattern matching."""

    def __init__(self, graph):
        self.graph = graph
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.consts = {t.name: t for t in graph.initializer}

    def node(self, name, op):
        n = self.producer.get(name)
        return n if n is not None and n.op_type == op else None

    def only_consumer(self, name, op):
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def const(self, name):
        from onnx import numpy_helper
        if name in self.consts:
            return numpy_helper.to_array(self.consts[name])
        n = self.producer.get(name)
        if n is not None and n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t)
        return None

    def other(self, node, name):
        """The input of a two-input node that is not `name`."""
        a, b = node.input
        return b if a == name else a if b == name else None


def _reduce_axis(node):
    """'last' or 'channels_first' for a keepdims ReduceMean over one channel axis of a 4-D tensor, else None."""
    axes = [list(a.ints) for a in node.attribute if a.name == "axes"]
    if node.op_type != "ReduceMean" or len(axes) != 1:
        return None
    return {(-1,): "last", (3,): "last", (1,): "channels_first"}.get(tuple(axes[0]))


def _match_layernorm(g: _Graph, recip):
    """Match the moments-style LayerNorm around `recip` (Reciprocal of Sqrt); return its parts and layout."""
    sqrt = g.node(recip.input[0], "Sqrt")
    add_eps = sqrt and g.node(sqrt.input[0], "Add")
    if not add_eps:
        return None
    var = next((g.node(i, "ReduceMean") for i in add_eps.input if g.node(i, "ReduceMean")), None)
    eps = g.const(g.other(add_eps, var.output[0])) if var else None
    square = var and g.node(var.input[0], "Mul")
    if eps is None or eps.size != 1 or not square or square.input[0] != square.input[1] or not _reduce_axis(var):
        return None
    diff = g.node(square.input[0], "Sub")
    if not diff:
        return None
    x = diff.input[0]
    mean_in = g.producer.get(diff.input[1])
    if mean_in is not None and mean_in.op_type == "Reshape":
        mean_in = g.producer.get(mean_in.input[0])
    if mean_in is None or mean_in.input[0] != x or _reduce_axis(mean_in) != _reduce_axis(var):
        return None
    scale = g.only_consumer(recip.output[0], "Mul")
    gamma = g.const(g.other(scale, recip.output[0])) if scale else None
    if gamma is None:
        return None
    users = g.consumers.get(scale.output[0], [])
    if len(users) != 2 or any(u.op_type != "Mul" for u in users):
        return None
    x_scaled = next((u for u in users if x in u.input), None)
    mean_scaled = next((u for u in users if u is not x_scaled), None)
    if x_scaled is None or mean_scaled is None:
        return None
    out = g.only_consumer(x_scaled.output[0], "Add")
    if out is None:
        return None
    shift_name = g.other(out, x_scaled.output[0])
    shift = g.producer.get(shift_name)
    neg = g.node(g.other(mean_scaled, scale.output[0]), "Neg")
    neg_ok = neg is not None and neg.input[0] == mean_in.output[0]
    if shift is mean_scaled and neg_ok:  # beta folded away as zero: shift = Neg(mean) * scale
        beta = np.zeros_like(gamma.reshape(-1))
        extra = [neg]
    elif shift is not None and shift.op_type == "Add" and neg_ok and mean_scaled.output[0] in shift.input:
        beta = g.const(g.other(shift, mean_scaled.output[0]))  # shift = Neg(mean) * scale + beta
        if beta is None:
            return None
        extra = [neg, shift]
    else:
        return None
    nodes = [mean_in, diff, square, var, add_eps, sqrt, recip, scale, x_scaled, mean_scaled, out, *extra]
    return x, gamma.reshape(-1), beta.reshape(-1), float(eps.reshape(-1)[0]), out.output[0], nodes, _reduce_axis(var)


def _match_gelu(g: _Graph, erf):
    """Match 0.5*x * (1 - erf(-x/sqrt2)) as tf2onnx writes exact GELU; return (x, out, nodes)."""
    scaled = g.node(erf.input[0], "Mul")
    neg_x = scaled and next((g.node(i, "Neg") for i in scaled.input if g.node(i, "Neg")), None)
    if not neg_x:
        return None
    c = g.const(g.other(scaled, neg_x.output[0]))
    x = neg_x.input[0]
    neg_erf = g.only_consumer(erf.output[0], "Neg")
    one_minus = neg_erf and g.only_consumer(neg_erf.output[0], "Add")
    one = one_minus and g.const(g.other(one_minus, neg_erf.output[0]))
    final = one_minus and g.only_consumer(one_minus.output[0], "Mul")
    if c is None or c.size != 1 or abs(float(c.reshape(-1)[0]) - 0.5 ** 0.5) > 1e-6 or one is None or not final:
        return None
    half_x = g.node(g.other(final, one_minus.output[0]), "Mul")
    half = half_x and g.const(g.other(half_x, x))
    if half is None or half.size != 1 or abs(float(half.reshape(-1)[0]) - 0.5) > 1e-7 or x not in half_x.input:
        return None
    return x, final.output[0], [neg_x, scaled, erf, neg_erf, one_minus, half_x, final]


def fuse_layernorm_gelu(model):
    """Rewrite tf2onnx's LayerNorm and GELU subgraphs into ONNX LayerNormalization and com.microsoft Gelu nodes."""
    from onnx import helper, numpy_helper
    g = _Graph(model.graph)
    remove, add, counts = set(), [], {"LayerNormalization": 0, "Gelu": 0}
    for node in list(model.graph.node):
        if node.op_type == "Reciprocal":
            found = _match_layernorm(g, node)
            if found:
                x, gamma, beta, eps, out, nodes, layout = found
                name = out.split(":")[0] + "_fused_ln"
                model.graph.initializer.extend([numpy_helper.from_array(gamma.astype(np.float32), name + "_gamma"),
                                                numpy_helper.from_array(beta.astype(np.float32), name + "_beta")])
                ln_in, ln_out = x, out
                if layout == "channels_first":  # tf2onnx moved to NCHW; ONNX LayerNorm wants the axis last
                    ln_in, ln_out = name + "_nhwc", name + "_out_nhwc"
                    add.append(helper.make_node("Transpose", [x], [ln_in], name=name + "_to_nhwc", perm=[0, 2, 3, 1]))
                    add.append(helper.make_node("Transpose", [ln_out], [out], name=name + "_to_nchw",
                                                perm=[0, 3, 1, 2]))
                add.append(helper.make_node("LayerNormalization", [ln_in, name + "_gamma", name + "_beta"], [ln_out],
                                            name=name, axis=-1, epsilon=eps))
                remove.update(id(n) for n in nodes if n is not g.producer.get(x))
                counts["LayerNormalization"] += 1
        elif node.op_type == "Erf":
            found = _match_gelu(g, node)
            if found:
                x, out, nodes = found
                add.append(helper.make_node("Gelu", [x], [out], name=out.split(":")[0] + "_fused_gelu",
                                            domain="com.microsoft"))
                remove.update(id(n) for n in nodes)
                counts["Gelu"] += 1
    if not add:
        return model, counts
    kept = [n for n in model.graph.node if id(n) not in remove]
    del model.graph.node[:]
    model.graph.node.extend(_toposort(kept + add))
    _drop_dead(model)
    if counts["Gelu"] and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model, counts


def _toposort(nodes):
    produced = {o: n for n in nodes for o in n.output}
    order, seen = [], set()

    def visit(n):
        if id(n) in seen:
            return
        seen.add(id(n))
        for i in n.input:
            if i in produced:
                visit(produced[i])
        order.append(n)

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(nodes) + 1000))
    for n in nodes:
        visit(n)
    return order


def _drop_dead(model):
    """Remove nodes and initializers no graph output depends on."""
    graph = model.graph
    needed = {o.name for o in graph.output}
    live = []
    for n in reversed(list(graph.node)):
        if any(o in needed for o in n.output):
            live.append(n)
            needed.update(n.input)
    live.reverse()
    del graph.node[:]
    graph.node.extend(live)
    inits = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)


# ---- export -----------------------------------------------------------------------------------------

def to_onnx(keras_model, opset: int = 17, fuse: bool = True):
    """ONNX model with input 'pixels' (batch,96,96,3) float32 raw 0-255 and output probabilities (batch,8)."""
    import tensorflow as tf
    import tf2onnx
    spec = [tf.TensorSpec((None, *keras_model.input_shape[1:]), tf.float32, name="pixels")]
    # from_keras is the path that works for ConvNeXt and EfficientNetV2 on these versions.
    onnx_model, _ = tf2onnx.convert.from_keras(keras_model, input_signature=spec, opset=opset)
    counts = {}
    if fuse:
        onnx_model, counts = fuse_layernorm_gelu(onnx_model)
    return onnx_model, counts


def parity(onnx_model, keras_model, images: np.ndarray, atol: float = 1e-4) -> dict:
    """Compare ONNX Runtime and Keras probabilities on the same images."""
    import onnxruntime as ort
    session = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = images.astype(np.float32)
    ours = session.run(None, {session.get_inputs()[0].name: x})[0]
    theirs = np.asarray(keras_model.predict(x, batch_size=64, verbose=0))
    max_diff = float(np.abs(ours - theirs).max()) if len(x) else 0.0
    same_argmax = bool(np.array_equal(ours.argmax(1), theirs.argmax(1)))
    return {"images": len(x), "max_abs_diff": max_diff, "same_argmax": same_argmax,
            "ok": max_diff < atol and same_argmax, "atol": atol}


def export_onnx(keras_model, path: str, check_images: np.ndarray, opset: int = 17, fuse: bool = True,
                atol: float = 1e-4) -> dict:
    """Convert, check parity with Keras on real images, then write atomically; refuse a model that disagrees."""
    if len(check_images) == 0:
        raise ValueError("export needs a batch of real images for the parity check")
    onnx_model, fused = to_onnx(keras_model, opset, fuse)
    check = parity(onnx_model, keras_model, check_images, atol)
    if not check["ok"]:
        raise ExportError(f"ONNX Runtime and Keras disagree (max abs diff {check['max_abs_diff']:.2e}, "
                          f"same argmax {check['same_argmax']}); {path} was not written")
    data = onnx_model.SerializeToString()
    files.write_bytes(path, data)
    return {"path": path, "bytes": len(data), "opset": opset, "fused": fused, "parity": check}
