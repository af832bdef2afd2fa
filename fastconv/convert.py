"""`fastconv.convert` / `fastconv.revert`: swap Keras' convolution layers in an existing model for
fastconv's twins (and back), and `fastconv.export`: a standalone artifact of such a model.

Only the exact classes `keras.layers.Conv2D` and `keras.layers.DepthwiseConv2D` are swapped (for
`fastconv.Conv2D` / `fastconv.DepthwiseConv2D`, and back), and the layers a convolution may compute
in its epilogue (`keras.layers.BatchNormalization`, `ReLU`, `Activation`, for fastconv.layers'
twins, which fold into the convolution before them in TensorFlow inference graphs; the
BatchNormalization twin also runs as the framework's fused batch normalization in TensorFlow
training and on torch); subclasses of them (e.g. SeparableConv2D's relatives, user subclasses with
their own `call`) and every other layer stay what they are. A twin is its Keras class plus an overridden call: same config, same weights,
same function.

- Sequential and Functional models (nested ones included) are cloned with
  `keras.models.clone_model(..., recursive=True)`: the result is a new model with the same layer
  names, configs and weight values; the original is left untouched.
- Subclassed models (and subclassed layers nested in a functional model) cannot be rebuilt from
  their config in general, so their convolution layers are converted *in place*: the layer object
  keeps its variables and only changes class (a twin adds no state). `convert` then returns the
  same model object.
"""

import warnings

import keras

from fastconv import _export, layers

_CONVOLUTIONS = {keras.layers.Conv2D: layers.Conv2D,
                 keras.layers.DepthwiseConv2D: layers.DepthwiseConv2D}
# the layers a convolution may compute in its epilogue (inference, TensorFlow)
_EPILOGUES = {keras.layers.BatchNormalization: layers.BatchNormalization,
              keras.layers.ReLU: layers.ReLU, keras.layers.Activation: layers.Activation}
_TO_FASTCONV = {**_CONVOLUTIONS, **_EPILOGUES}
_TO_KERAS = {twin: original for original, twin in _TO_FASTCONV.items()}

keras_convolution = _export.keras_convolution


def convert(model):
    """A model like `model` whose `keras.layers.Conv2D` and `keras.layers.DepthwiseConv2D` layers
    are fastconv's, holding the same weights (predictions equal to float32 rounding).

    Sequential/Functional models are cloned (the original is unchanged, the compile config is
    carried over); subclassed models are converted in place and returned. Layers fastconv does not
    serve (Conv1D, Conv3D, SeparableConv2D, Conv2DTranspose, ...) are kept as they are.
    BatchNormalization, ReLU and Activation layers become fastconv.layers' twins (Keras' layers
    that fold into the convolution before them in TensorFlow inference graphs; the
    BatchNormalization twin runs as the framework's fused batch norm in TensorFlow training and
    on torch).
    """
    return _swap(model, _TO_FASTCONV, "convert")


def revert(model):
    """The inverse of `convert`: fastconv layers become `keras.layers.Conv2D` /
    `keras.layers.DepthwiseConv2D` again (e.g. before exporting to a format fastconv cannot
    serve, or to run on an accelerator with Keras' own kernels)."""
    return _swap(model, _TO_KERAS, "revert")


def export(model, filepath, format="tf_saved_model", **kwargs):
    """`model.export(filepath, format, **kwargs)` with every fastconv layer computing with Keras'
    own convolution while it is traced: the artifact runs where fastconv is not installed.

    (`model.export` and `keras.export.ExportArchive` already do this by themselves; this function
    makes it explicit, and also covers an export started outside Keras' export machinery.)
    """
    with keras_convolution():
        return model.export(filepath, format=format, **kwargs)


def _check_model(model, verb):
    if not isinstance(model, keras.layers.Layer):
        raise TypeError(
            f"fastconv.{verb} expects a Keras model or layer. "
            f"Received: model={model!r} of type {type(model).__name__}"
        )


def _swap(model, mapping, verb):
    _check_model(model, verb)
    if type(model) in mapping:  # a single layer
        if not model.built:
            return mapping[type(model)].from_config(model.get_config())
        return _twin(model, mapping)
    if isinstance(model, (keras.Sequential, keras.Model)) and _clonable(model):
        return _clone(model, mapping)
    _in_place(model, mapping)
    return model


def _clonable(model):
    from keras.src.models.functional import Functional

    return isinstance(model, (keras.Sequential, Functional))


def _twin(layer, mapping):
    """A new layer of the twin class with `layer`'s config and weight values."""
    twin = mapping[type(layer)].from_config(layer.get_config())
    if layer.built:
        twin.build_from_config(layer.get_build_config())
        twin.set_weights(layer.get_weights())
    return twin


def _clone(model, mapping):
    pairs = []  # (original, clone) for every leaf layer whose weights must be copied

    def clone_layer(layer):
        if type(layer) in mapping:
            return _twin(layer, mapping)
        try:
            clone = layer.__class__.from_config(layer.get_config())
        except Exception as error:  # a custom layer Keras cannot rebuild: share it
            warnings.warn(
                f"fastconv: layer {layer.name!r} ({type(layer).__name__}) cannot be rebuilt "
                f"from its config ({error}); the converted model shares it with the original, "
                "and its convolutions are converted in place.",
                stacklevel=4,
            )
            _in_place(layer, mapping)
            return layer
        pairs.append((layer, clone))
        return clone

    clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    for original, new in pairs:
        # (operations applied to Keras tensors in a functional model, `x + y` or `ops.add`, are
        # cloned too: they are not layers and hold no weights)
        if isinstance(original, keras.layers.Layer) and original.weights:
            if not new.built:
                new.build_from_config(original.get_build_config())
            new.set_weights(original.get_weights())
            # A rebuilt custom layer keeps its Keras convolutions: convert those in place.
            _in_place(new, mapping)
    if clone.compiled:
        _after_swap(clone)
    return clone


def _in_place(layer, mapping):
    """Change the class of every convertible layer inside `layer` (which keeps its variables)."""
    changed = False
    for sub in layer._flatten_layers(include_self=False, recursive=True):
        target = mapping.get(type(sub))
        if target is not None:
            sub.__class__ = target
            # The only state a convolution twin sets in __init__ (on TensorFlow, no XLA for
            # host callbacks); Keras' own convolutions support it.
            if target in _CONVOLUTIONS.values():
                sub.supports_jit = keras.backend.backend() != "tensorflow"
            elif target in _CONVOLUTIONS:
                sub.supports_jit = True
            changed = True
    if changed and isinstance(layer, keras.Model):
        _after_swap(layer)


def _after_swap(model):
    # Functions traced with the old layers must be traced again; XLA cannot compile fastconv's
    # TensorFlow ops (or its host callbacks).
    model.train_function = model.test_function = model.predict_function = None
    if getattr(model, "compiled", False) and model._jit_compile:
        from keras.src.trainers.trainer import model_supports_jit

        if not model_supports_jit(model):
            model._jit_compile = False
