"""Adversarial training losses, as the official code computes them (batch means).

- `ce`: cross-entropy on adversarial examples (PGD-AT, Madry et al.).
- `trades`: CE(clean) + beta * KL(softmax(clean) || softmax(adv)), KL summed over classes and
  averaged over the batch; gradients flow through both branches (Zhang et al.).
- `mart`: CE(adv) + NLL(log(1.0001 - p_adv), strongest wrong class) + beta * mean over the
  batch of KL(p_clean || p_adv) * (1.0000001 - p_clean[y]) (Wang et al.; the official code's
  constants).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax.scipy.special import xlogy

LOSS_NAMES = ("ce", "trades", "mart")


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
    """Mean CE; with label smoothing eps the target is (1 - eps) one-hot + eps / K, as
    PyTorch's CrossEntropyLoss(label_smoothing=eps)."""
    if not smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def kl_per_example(target_probs: jax.Array, log_probs: jax.Array) -> jax.Array:
    """sum_k p_k (log p_k - log q_k), with 0 log 0 = 0 (PyTorch's KLDivLoss)."""
    return jnp.sum(xlogy(target_probs, target_probs) - target_probs * log_probs, axis=-1)


def trades(clean_logits: jax.Array, adv_logits: jax.Array, labels: jax.Array,
           beta: float = 6.0, smoothing: float = 0.0) -> jax.Array:
    natural = cross_entropy(clean_logits, labels, smoothing)
    robust = kl_per_example(jax.nn.softmax(clean_logits), jax.nn.log_softmax(adv_logits)).mean()
    return natural + beta * robust


def mart(clean_logits: jax.Array, adv_logits: jax.Array, labels: jax.Array,
         beta: float = 6.0, smoothing: float = 0.0) -> jax.Array:
    adv_probs = jax.nn.softmax(adv_logits)
    top2 = jnp.argsort(adv_probs, axis=1)[:, -2:]
    strongest_wrong = jnp.where(top2[:, -1] == labels, top2[:, -2], top2[:, -1])
    margin_term = -jnp.take_along_axis(jnp.log(1.0001 - adv_probs + 1e-12),
                                       strongest_wrong[:, None], axis=1)[:, 0]
    loss_adv = cross_entropy(adv_logits, labels, smoothing) + margin_term.mean()
    clean_probs = jax.nn.softmax(clean_logits)
    true_probs = jnp.take_along_axis(clean_probs, labels[:, None], axis=1)[:, 0]
    kl = kl_per_example(clean_probs, jnp.log(adv_probs + 1e-12))
    return loss_adv + beta * jnp.mean(kl * (1.0000001 - true_probs))


def adversarial_loss(name: str, clean_logits, adv_logits, labels, beta: float,
                     label_smoothing: float = 0.0) -> jax.Array:
    """The training loss; label smoothing applies to its cross-entropy terms only."""
    if name == "ce":
        return cross_entropy(adv_logits, labels, label_smoothing)
    if name == "trades":
        return trades(clean_logits, adv_logits, labels, beta, label_smoothing)
    if name == "mart":
        return mart(clean_logits, adv_logits, labels, beta, label_smoothing)
    raise ValueError(f"Unknown loss {name!r}; use one of {LOSS_NAMES}.")
