"""The paper's energy: pixel-wise soft-max with weighted cross-entropy, and soft Dice.

Section 3 of the paper trains with ``E = sum_x w(x) log p_l(x)(x)`` where
``p_k(x) = exp(a_k(x)) / sum_k' exp(a_k'(x))`` is the soft-max over the final
feature map and ``w`` the precomputed weight map (``unetile.data.weights``).

Reduction: the paper sums over pixels. We divide that sum by the number of
annotated pixels (the mean of ``w(x) * -log p_l(x)(x)`` over annotated pixels),
so that the gradient, and with it a good learning rate, does not change with
the tile size or the number of unannotated pixels. Multiplying by the number
of annotated pixels gives back the paper's sum. The normaliser is the pixel
count, not ``sum_x w(x)``: the weights keep their meaning of "this pixel counts
``w(x)`` times as much as a pixel of weight 1".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_inputs(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None,
    ignore_index: int | None,
) -> None:
    """Raise ``ValueError`` when shapes, dtypes or label values do not fit together.

    Label values are checked on CPU tensors only: on a GPU a bad label ends in
    torch's device-side assert instead (training data is checked when read).
    """
    if logits.ndim not in (4, 5):
        raise ValueError(
            f"logits must have shape (N, K, H, W) or (N, K, D, H, W), got {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor, got {logits.dtype}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(
            f"target must have shape {expected} (logits without the class axis), got "
            f"{tuple(target.shape)}; crop the labels to the network's output with "
            "unetile.network.model.output_size"
        )
    if target.dtype.is_floating_point or target.dtype == torch.bool:
        raise ValueError(f"target must hold integer class labels (int64), got {target.dtype}")
    if weights is not None and tuple(weights.shape) != expected:
        raise ValueError(
            f"weights must have the shape of target {expected}, got {tuple(weights.shape)}"
        )
    if target.device.type != "cpu":
        # Reading the values back would stop the host on every batch of a GPU
        # run; training labels are checked when they are read from disk.
        return
    num_classes = logits.shape[1]
    annotated = target if ignore_index is None else target[target != ignore_index]
    if annotated.numel() and (int(annotated.min()) < 0 or int(annotated.max()) >= num_classes):
        raise ValueError(
            f"target labels must lie in [0, {num_classes - 1}] for {num_classes} classes"
            f"{'' if ignore_index is None else f' or equal ignore_index={ignore_index}'}, "
            f"got values in [{int(annotated.min())}, {int(annotated.max())}]"
        )


def _annotated(target: torch.Tensor, ignore_index: int | None):
    """Mask of annotated pixels, and the target with ignored pixels set to class 0.

    Ignored pixels may carry a label outside [0, K); gather and one-hot need a
    valid index there, and the mask keeps them out of every sum.
    """
    if ignore_index is None:
        return torch.ones_like(target, dtype=torch.bool), target
    annotated = target != ignore_index
    return annotated, torch.where(annotated, target, torch.zeros_like(target))


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int | None = None,
) -> torch.Tensor:
    """Pixel-wise soft-max cross-entropy weighted by the weight map ``w(x)``.

    Parameters
    ----------
    logits : torch.Tensor
        Network output ``a_k(x)``, float, shape (N, K, H, W) or (N, K, D, H, W),
        any number of classes K >= 1.
    target : torch.Tensor
        True labels ``l(x)``, integer (int64), shape (N, H, W) or (N, D, H, W).
    weights : torch.Tensor or None
        Weight map ``w(x)``, float, shape of ``target``. None means ``w = 1``.
    ignore_index : int or None
        Label of unannotated pixels: they contribute nothing and are not counted
        in the normaliser.

    Returns
    -------
    torch.Tensor
        Scalar: the mean over annotated pixels of ``w(x) * -log p_l(x)(x)``
        (nats). Zero (with a gradient of zero) when no pixel is annotated.

    Notes
    -----
    ``log p`` is computed with ``log_softmax`` (the log-sum-exp trick), so logits
    of any magnitude (1e4 and more) give finite losses and gradients.

    Examples
    --------
    >>> logits = torch.tensor([[[[0.0]], [[0.0]]]])  # 1 pixel, 2 classes, p = 1/2
    >>> round(float(weighted_cross_entropy(logits, torch.tensor([[[1]]]))), 4)
    0.6931
    """
    _check_inputs(logits, target, weights, ignore_index)
    log_probability = F.log_softmax(logits, dim=1)
    annotated, safe_target = _annotated(target, ignore_index)
    negative_log_likelihood = -log_probability.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    if weights is not None:
        negative_log_likelihood = negative_log_likelihood * weights.to(log_probability.dtype)
    # where() rather than a multiply: 0 * inf from a masked pixel would give nan.
    negative_log_likelihood = torch.where(
        annotated, negative_log_likelihood, torch.zeros_like(negative_log_likelihood)
    )
    count = annotated.sum().clamp(min=1)
    return negative_log_likelihood.sum() / count


def dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int | None = None,
    eps: float = 1.0,
    include_background: bool = True,
) -> torch.Tensor:
    """Soft Dice loss over classes: ``1 - mean_k Dice_k`` of the soft-max output.

    ``Dice_k = (2 * sum_x p_k(x) g_k(x) + eps) / (sum_x p_k(x) + sum_x g_k(x) + eps)``
    with ``g_k`` the one-hot target; the sums run over every annotated pixel of
    the whole batch (one Dice per class, not per image, so that a tile without
    any pixel of a class does not dominate the loss).

    Parameters
    ----------
    logits : torch.Tensor
        Network output, float, shape (N, K, H, W) or (N, K, D, H, W).
    target : torch.Tensor
        Integer labels, shape (N, H, W) or (N, D, H, W).
    ignore_index : int or None
        Label of unannotated pixels, left out of every sum.
    eps : float
        Smoothing, in pixels: a class absent from both prediction and target
        scores Dice 1, and the gradient stays bounded for rare classes.
    include_background : bool
        Average over all classes (default, True). False leaves class 0 out of
        the mean, the usual choice when the background dominates and only the
        foreground classes matter; needs K >= 2.

    Returns
    -------
    torch.Tensor
        Scalar in [0, 1]; about 0 for a perfect, confident prediction.
    """
    _check_inputs(logits, target, None, ignore_index)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    num_classes = logits.shape[1]
    if not include_background and num_classes < 2:
        raise ValueError("include_background=False needs at least 2 classes (K >= 2)")
    probability = F.softmax(logits, dim=1)
    annotated, safe_target = _annotated(target, ignore_index)
    # (N, *S, K) -> (N, K, *S), masked so that ignored pixels count nowhere.
    one_hot = F.one_hot(safe_target, num_classes).movedim(-1, 1).to(probability.dtype)
    mask = annotated.unsqueeze(1).to(probability.dtype)
    probability = probability * mask
    one_hot = one_hot * mask
    summed_axes = [0, *range(2, logits.ndim)]
    intersection = (probability * one_hot).sum(dim=summed_axes)
    total = probability.sum(dim=summed_axes) + one_hot.sum(dim=summed_axes)
    dice = (2.0 * intersection + eps) / (total + eps).clamp(min=torch.finfo(total.dtype).tiny)
    if not include_background:
        dice = dice[1:]
    return 1.0 - dice.mean()


def combined_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weights: torch.Tensor | None = None,
    ignore_index: int | None = None,
    dice_weight: float = 1.0,
    eps: float = 1.0,
    include_background: bool = True,
) -> torch.Tensor:
    """The trainer's "Dice + CE" loss: weighted cross-entropy plus ``dice_weight`` x Dice.

    Parameters
    ----------
    logits, target, weights, ignore_index
        As in :func:`weighted_cross_entropy`; the weight map acts on the
        cross-entropy term only (Dice has no per-pixel weights).
    dice_weight : float
        Factor of the Dice term (>= 0); 0 gives the paper's loss.
    eps, include_background
        As in :func:`dice_loss`.

    Returns
    -------
    torch.Tensor
        Scalar ``weighted_cross_entropy + dice_weight * dice_loss``.
    """
    if dice_weight < 0:
        raise ValueError(f"dice_weight must be >= 0, got {dice_weight}")
    cross_entropy = weighted_cross_entropy(logits, target, weights, ignore_index)
    if dice_weight == 0:
        return cross_entropy
    dice = dice_loss(logits, target, ignore_index, eps=eps, include_background=include_background)
    return cross_entropy + dice_weight * dice
