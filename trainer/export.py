"""Export a Keras model to ONNX (tf2onnx, opset 17) with fused LayerNorm/GELU, float16 weights and a parity check."""
from __future__ import annotations

import contextlib
import gc
import hashlib
import os
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
    # Deleted in place: copying the kept ones back in would leave a second copy of the weights in the message.
    for i in reversed([i for i, t in enumerate(graph.initializer) if t.name not in needed]):
        del graph.initializer[i]


# ---- float16 weights ----------------------------------------------------------------------------------

def store_float16(model) -> int:
    """Store the weight matrices and kernels as float16 initializers, each read through a Cast to float32.

    ONNX Runtime folds the casts when it loads the model, so it computes in float32 as before; the file is about
    half the size. Standard ops only (Cast, to=FLOAT), so any ONNX interpreter runs it. Vectors and scalars
    (biases, norm scales, constants) stay float32: a fraction of a percent of the bytes, where float16 would only
    add error; so does a tensor with a value beyond float16's range. Returns how many tensors were converted.
    """
    from onnx import TensorProto, helper, numpy_helper
    graph = model.graph
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output}
    casts = []
    for tensor in graph.initializer:
        if tensor.data_type != TensorProto.FLOAT or sum(d > 1 for d in tensor.dims) < 2:
            continue
        values = numpy_helper.to_array(tensor)
        if np.abs(values).max() > np.finfo(np.float16).max:
            continue
        name, stored = tensor.name, tensor.name + "_float16"
        while stored in taken:
            stored += "_"
        taken.add(stored)
        tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float16), stored))
        casts.append(helper.make_node("Cast", [stored], [name], name=stored + "_to_float32", to=TensorProto.FLOAT))
    if casts:
        nodes = casts + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return len(casts)


# ---- export -----------------------------------------------------------------------------------------

CATCH_ERRORS = "TF2ONNX_CATCH_ERRORS"
WEIGHT_BYTES = 1024  # a Const node holding more than this is a weight: it waits outside while grappler runs


def _weights_aside(graph_def):
    """A copy of graph_def whose weights are Placeholders of the same dtype and shape, and the weights by name.

    Grappler copies the graph it gets several times over: ConvNeXtBase (352 MB of weights) went from 2.9 to 6.1 GB
    resident in it, and from 2.26 to 2.30 GB without them. A Placeholder cannot be folded or merged away, so each
    weight comes back whole. One difference: grappler no longer sees a bias that is all zeros (as in an untrained
    model) and keeps its Add.
    """
    from tensorflow.core.framework import graph_pb2, tensor_pb2
    light, aside = graph_pb2.GraphDef(), {}
    light.versions.CopyFrom(graph_def.versions)
    light.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        kept = light.node.add()
        if node.op != "Const" or len(node.attr["value"].tensor.tensor_content) <= WEIGHT_BYTES:
            kept.CopyFrom(node)
            continue
        tensor = aside[node.name] = tensor_pb2.TensorProto()
        tensor.CopyFrom(node.attr["value"].tensor)
        kept.name, kept.op, kept.device = node.name, "Placeholder", node.device
        kept.input.extend(node.input)  # control inputs only, if any
        kept.attr["dtype"].type = tensor.dtype
        kept.attr["shape"].shape.CopyFrom(tensor.tensor_shape)
    return light, aside


def _weights_back(graph_def, aside: dict) -> None:
    """Turn _weights_aside's Placeholders back into the Const nodes they were (one dropped as unused stays out)."""
    for node in graph_def.node:
        if node.op == "Placeholder" and node.name in aside:
            node.op = "Const"
            del node.attr["shape"]
            node.attr["value"].tensor.CopyFrom(aside.pop(node.name))


def _freeze(func, input_names, output_names, large_model=False):
    """tf2onnx's tf_loader.from_function (freeze, then TF's grappler) with two fewer sets of copies.

    The GraphDef comes from TF's variable-to-constant rewrite directly (tf2onnx's large-model converter), without
    the frozen concrete function the regular path builds only to print it back (ConvNeXtBase: from 1.5 to 5.1 GB
    resident that way, to 2.2 GB this way), and grappler runs with the weights set aside (_weights_aside).
    """
    import tensorflow as tf
    from tf2onnx import tf_loader
    graph_def = tf_loader.convert_variables_to_constants_large_model(func)
    graph_def = tf_loader.fix_freezing_errors_part2(tf_loader.fix_freezing_errors(graph_def))
    light, aside = _weights_aside(graph_def)
    del graph_def
    with tf.Graph().as_default() as graph, tf_loader.tf_session(graph=graph) as sess:
        tf.import_graph_def(light, name="")
        input_names = tf_loader.inputs_without_resource(sess, input_names)
        optimized = tf_loader.tf_optimize(input_names, output_names, light)
    _weights_back(optimized, aside)
    return optimized


@contextlib.contextmanager
def _lean_tf2onnx():
    """tf2onnx's from_keras, less the copies of the weights that took ConvNeXtBase (352 MB) to 10.7 GB and 112 s
    (now 3.7 GB and 34 s, from 1.5 GB at rest).

    - Freezing and grappler: see _freeze.
    - Optimizer passes: tf2onnx deep-copies the graph before each of its 12 passes, up to 3 rounds, so that a
      pass that raises can be skipped; TF2ONNX_CATCH_ERRORS=FALSE turns the copies off (tf2onnx 1.17 reads any
      value as off, a later fix would read this one so too), and a failing pass stops the export instead.
    - After each pass tf2onnx re-adds every constant's tensor to its NodeProto. With the upb protobuf the
      replaced tensor stays in the message's memory until the message dies: 350 MB more a pass, 15 GB without
      the copies above. A constant node gets a fresh NodeProto instead, and its old one is freed.
    Only for the duration of the call; the parity check guards the result as before.
    """
    from onnx import NodeProto
    from tf2onnx import tf_loader
    from tf2onnx.graph import Node
    from_function, update_proto, catch = tf_loader.from_function, Node.update_proto, os.environ.get(CATCH_ERRORS)

    def fresh_update_proto(node, external_tensor_storage=None):
        if node.is_const():
            old = node._op
            node._op = NodeProto(name=old.name, op_type=old.op_type, domain=old.domain)
        return update_proto(node, external_tensor_storage)

    tf_loader.from_function, Node.update_proto = _freeze, fresh_update_proto
    os.environ[CATCH_ERRORS] = "FALSE"
    try:
        yield
    finally:
        tf_loader.from_function, Node.update_proto = from_function, update_proto
        if catch is None:
            os.environ.pop(CATCH_ERRORS, None)
        else:
            os.environ[CATCH_ERRORS] = catch


def to_onnx(keras_model, opset: int = 17, fuse: bool = True, lean: bool = True):
    """ONNX model with input 'pixels' (batch,96,96,3) float32 raw 0-255 and output probabilities (batch,8).

    lean=False: tf2onnx exactly as shipped (the tests compare the two)."""
    import tensorflow as tf
    import tf2onnx
    spec = [tf.TensorSpec((None, *keras_model.input_shape[1:]), tf.float32, name="pixels")]
    # from_keras is the path that works for ConvNeXt and EfficientNetV2 on these versions.
    with _lean_tf2onnx() if lean else contextlib.nullcontext():
        onnx_model, _ = tf2onnx.convert.from_keras(keras_model, input_signature=spec, opset=opset)
    gc.collect()  # tf2onnx's graphs are reference cycles: free them before the next copy of the weights
    counts = {}
    if fuse:
        onnx_model, counts = fuse_layernorm_gelu(onnx_model)
    return onnx_model, counts


MARGIN = 1e-3  # float16 weights: a label may differ from Keras only where Keras's top two are this close


def parity(data: bytes, keras_model, images: np.ndarray, atol: float = 1e-4, weights: str = "float32",
           batch_size: int = 64) -> dict:
    """Compare ONNX Runtime (on the serialized model) and Keras on the same images, both in batches."""
    import onnxruntime as ort
    x = images.astype(np.float32)
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    ours = np.concatenate([session.run(None, {name: x[i:i + batch_size]})[0] for i in range(0, len(x), batch_size)])
    del session
    theirs = np.asarray(keras_model.predict(x, batch_size=batch_size, verbose=0))
    return agreement(ours, theirs, weights, atol)


def agreement(ours: np.ndarray, theirs: np.ndarray, weights: str = "float32", atol: float = 1e-4) -> dict:
    """Whether ONNX probabilities (ours) match Keras's (theirs) well enough to write the model.

    float32 weights: within atol, with the same labels. float16 weights are rounded, so every output moves a
    little: a label may differ only where Keras's top two are within MARGIN of each other.
    """
    top_two = np.sort(theirs, axis=1)[:, -2:]
    margin = top_two[:, 1] - top_two[:, 0]
    differ = ours.argmax(1) != theirs.argmax(1)
    max_diff = float(np.abs(ours - theirs).max()) if len(ours) else 0.0
    check = {"images": len(ours), "weights": weights, "max_abs_diff": max_diff, "same_argmax": not differ.any(),
             "labels_differ": int(differ.sum()),
             "smallest_margin_differing": float(margin[differ].min()) if differ.any() else None}
    if weights == "float16":
        beyond = int((differ & (margin > MARGIN)).sum())
        check.update(rule="margin", margin=MARGIN, labels_differ_beyond_margin=beyond, ok=beyond == 0)
    else:
        check.update(rule="atol", atol=atol, ok=max_diff < atol and not differ.any())
    return check


def _unmeasured(name: str, batch_size: int | None = None):
    return contextlib.nullcontext()


def export_onnx(keras_model, path: str, check_images: np.ndarray, opset: int = 17, fuse: bool = True,
                atol: float = 1e-4, weights: str = "float32", batch_size: int = 64, step=None) -> dict:
    """Convert, check parity with Keras on real images, then write atomically; refuse a model that disagrees.

    The model is serialized once: the parity check, the file and its sha256 all use those bytes. step(name,
    batch_size) is a context manager around each part (memory.Steps.step measures them).
    """
    if len(check_images) == 0:
        raise ValueError("export needs a batch of real images for the parity check")
    if weights not in ("float32", "float16"):
        raise ValueError(f"weights is {weights!r}; choose float32 or float16")
    step = step or _unmeasured
    with step("export: convert"):
        onnx_model, fused = to_onnx(keras_model, opset, fuse)
        halved = store_float16(onnx_model) if weights == "float16" else 0
        data = onnx_model.SerializeToString()
        del onnx_model
    with step("export: parity check", batch_size):
        check = parity(data, keras_model, check_images, atol, weights, batch_size)
    if not check["ok"]:
        rule = (f"{check['labels_differ']} of {check['images']} labels differ, {check['labels_differ_beyond_margin']} "
                f"where Keras's top two are more than {MARGIN:g} apart"
                if weights == "float16" else
                f"max abs diff {check['max_abs_diff']:.2e}, same argmax {check['same_argmax']}")
        raise ExportError(f"ONNX Runtime and Keras disagree ({rule}); {path} was not written")
    files.write_bytes(path, data)
    return {"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(), "opset": opset,
            "fused": fused, "weights": weights, "float16_tensors": halved, "parity": check}
