"""Colorization encoders and the model registry.

Every model takes the L channel in raw Lab units, (B, 1, H, W) float32 in [0, 100], normalises it
internally ((L - 50) / 100) and returns logits (B, out_dim, h, w) at its own output resolution.
Every model exposes ``forward_features``, ``forward_head``, ``reset_classifier``, ``feature_info``
(``dict(num_chs, reduction, module)`` with ``module`` both the tap name and the name of the
submodule whose output is the tap) and a class attribute ``supports_points``.

The registry is a plain dict filled by ``@register_model``; the model files are imported explicitly
at the bottom of this file (no auto-import).
"""
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn as nn

__all__ = ['register_model', 'create_model', 'list_models', 'extract_taps', 'model_from_checkpoint']

_model_registry: Dict[str, Callable[..., nn.Module]] = {}

TIMM_PREFIX = 'timm:'


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register a builder under its function name."""
    name = fn.__name__
    if name in _model_registry:
        raise ValueError(f'model {name!r} registered twice')
    _model_registry[name] = fn
    return fn


def list_models() -> List[str]:
    """Registered model names (``create_model`` also accepts ``timm:<timm_name>``)."""
    return sorted(n for n in _model_registry if n != 'timm_cc')


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a model by registry name, or any timm model as ``timm:<timm_name>``."""
    if name.startswith(TIMM_PREFIX):
        return _model_registry['timm_cc'](name[len(TIMM_PREFIX):], **kwargs)
    if name not in _model_registry or name == 'timm_cc':
        raise ValueError(f'unknown model {name!r}; available: {list_models()} or timm:<name>')
    return _model_registry[name](**kwargs)


def extract_taps(model: nn.Module, L: torch.Tensor, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    """Run ``model.forward_features(L)`` and return the named intermediate activations.

    Taps are read with forward hooks on the submodules named in ``model.feature_info``; the hooks
    are removed afterwards even if the forward pass raises. Gradients flow through the returned
    tensors unless the caller wraps this in ``torch.no_grad()``.

    Args:
        model: a model from ``create_model``.
        L: (B, 1, H, W) L channel in [0, 100].
        names: tap names, a subset of ``[f['module'] for f in model.feature_info]``.
    Returns:
        dict name -> (B, C, h, w) tensor, in the order of ``names``.
    """
    available = [f['module'] for f in model.feature_info]
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f'unknown taps {unknown}; available taps: {available}')
    modules = dict(model.named_modules())
    out: Dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(_m, _inp, output, n=n):
            out[n] = output
        handles.append(modules[n].register_forward_hook(hook))
    try:
        model.forward_features(L)
    finally:
        for h in handles:
            h.remove()
    return {n: out[n] for n in names}


def model_from_checkpoint(ckpt: dict) -> nn.Module:
    """Build ``ckpt['model_name']`` with ``ckpt.get('model_kwargs', {})`` and load ``ckpt['model']`` strictly (a
    ``pretrained`` weight file among the kwargs is not read again: the checkpoint holds the weights)."""
    kwargs = {k: v for k, v in ckpt.get('model_kwargs', {}).items() if k != 'pretrained'}
    model = create_model(ckpt['model_name'], **kwargs)
    model.load_state_dict(ckpt['model'], strict=True)
    return model


# explicit imports fill the registry (kept at the bottom: the model files import register_model)
from . import alexnet_cc, hypercolumn, timm_cc, zhang_vgg  # noqa: E402,F401
