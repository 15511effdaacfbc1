"""Brute-force reference implementations of the paper's formulas, written for clarity, not speed.

The fast code in swift_gradpruner must agree with these; nothing here is imported by the package.
"""

from __future__ import annotations

import math

import torch


def igia(steps):
    """Eq. 2-3: materialise every simulated gradient G_i = gB_i @ gA_i, square it, average (float64)."""
    total, count = {}, 0
    for grads in steps:
        for name, (grad_a, grad_b) in grads.items():
            g = grad_b.to(torch.float64) @ grad_a.to(torch.float64)
            total[name] = total.get(name, 0) + g * g
        count += 1
    return {name: value / count for name, value in total.items()}


def frobenius_norm_mean(steps):
    """Authors' code variant: mean over steps of ||G_i||_F."""
    total, count = {}, 0
    for grads in steps:
        for name, (grad_a, grad_b) in grads.items():
            g = grad_b.to(torch.float64) @ grad_a.to(torch.float64)
            total[name] = total.get(name, 0.0) + math.sqrt(float((g * g).sum()))
        count += 1
    return {name: value / count for name, value in total.items()}


def top_indices(importance, topp):
    """Flat indices of the ceil(topp * n) largest importances, by a full sort."""
    flat = importance.flatten().tolist()
    keep = math.ceil(topp * len(flat))
    order = sorted(range(len(flat)), key=lambda i: -flat[i])
    return {i for i in order[:keep] if flat[i] > 0}


def sign(x):
    x = float(x)
    return (x > 0) - (x < 0)


def merge(retained, sources, topp, mode, retained_importance=None):
    """Eq. 5 / App. B.2, element by element with Python loops."""
    flat_r = retained.flatten().tolist()
    flat_fr = retained_importance.flatten().tolist() if retained_importance is not None else None
    tops = [top_indices(f, topp) for _, f in sources]
    flats = [(w.flatten().tolist(), f.flatten().tolist()) for w, f in sources]
    out = []
    for j, wr in enumerate(flat_r):
        taking = [(wm[j], fm[j]) for (wm, fm), top in zip(flats, tops) if j in top and sign(wm[j]) == sign(wr)]
        if mode == "add":
            out.append(wr + sum(w for w, _ in taking))
        elif mode == "average":
            out.append((wr + sum(w for w, _ in taking)) / (1 + len(taking)))
        elif mode == "fisher":
            num = flat_fr[j] * wr + sum(f * w for w, f in taking)
            den = flat_fr[j] + sum(f for _, f in taking)
            out.append(num / den if den > 0 else wr)
    return torch.tensor(out, dtype=torch.float64).reshape(retained.shape)


def answer_loss(model, batches):
    """Token-weighted mean next-token loss over labelled tokens, through the model's own full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            labels = batch["labels"][:, 1:]
            keep = labels != -100
            lp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
            total -= float(lp[keep].gather(1, labels[keep][:, None]).sum())
            count += int(keep.sum())
    return total / count


def kl_to(dense, pruned, batches):
    """Mean KL(p_dense || p_pruned) over the real tokens of ``batches``, from both models' own full logits."""
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            real = batch["attention_mask"].bool()
            logp, logq = (
                torch.log_softmax(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False).logits.double(), -1)[real]
                for m in (dense, pruned)
            )  # fmt: skip
            total += float((logp.exp() * (logp - logq)).sum())
            count += int(real.sum())
    return total / count


def kl_first(model_factory, batches):
    """KL from the dense model after removing each single layer, by deleting it from a fresh copy."""
    from swift_gradpruner.surgery import remove_layers

    dense = model_factory()
    out = []
    for j in range(dense.config.num_hidden_layers):
        model = model_factory()
        remove_layers(model, [j])
        out.append(kl_to(dense, model, batches))
    return out


def skip_loss_first(model_factory, batches):
    """Loss after removing each single layer, by deleting it from a fresh copy of the model."""
    from swift_gradpruner.surgery import remove_layers

    num = model_factory().config.num_hidden_layers
    out = []
    for j in range(num):
        model = model_factory()
        remove_layers(model, [j])
        out.append(answer_loss(model, batches))
    return out


def layer_states(model, batch):
    """h_0 .. h_L: the input of every decoder layer and the output of the last one (before the final norm)."""
    states = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, k: states.append(k.get("hidden_states", a[0] if a else None)),
                                             with_kwargs=True) for layer in model.model.layers]  # fmt: skip
    hooks.append(model.model.norm.register_forward_pre_hook(lambda m, a: states.append(a[0])))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    for hook in hooks:
        hook.remove()
    return states


def block_influence(model, batches):
    """ShortGPT BI, token by token in Python: 1 - mean over real tokens of cos(h_l, h_l+1)."""
    num = model.config.num_hidden_layers
    sums, count = [0.0] * num, 0
    for batch in batches:
        states = layer_states(model, batch)
        for b in range(batch["input_ids"].shape[0]):
            for t in range(batch["input_ids"].shape[1]):
                if not batch["attention_mask"][b, t]:
                    continue
                count += 1
                for j in range(num):
                    x, y = states[j][b, t].double(), states[j + 1][b, t].double()
                    sums[j] += float(x @ y / (x.norm() * y.norm()))
    return [1 - s / count for s in sums]


def angular_distances(model, batches, size):
    """Gromov et al.: mean over rows of arccos(cos(h_l, h_l+n)) / pi at each row's last real token."""
    num = model.config.num_hidden_layers
    sums, rows = [0.0] * (num - size + 1), 0
    for batch in batches:
        states = layer_states(model, batch)
        for b in range(batch["input_ids"].shape[0]):
            t = int(batch["attention_mask"][b].sum()) - 1
            rows += 1
            for start in range(num - size + 1):
                x, y = states[start][b, t].double(), states[start + size][b, t].double()
                cos = max(-1.0, min(1.0, float(x @ y / (x.norm() * y.norm()))))
                sums[start] += math.acos(cos) / math.pi
    return [s / rows for s in sums]
