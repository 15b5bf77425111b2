import io

import pytest
import torch

from gazelle.trainers.adamw8bit import (
    AdamW8bit,
    _dynamic_codebook,
    dequantize_blockwise,
    quantize_blockwise,
)

HP = {"lr": 1e-2, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05}


def _regression(seed: int = 0, fin: int = 128, fout: int = 512, n: int = 512):
    """Noisy least squares whose weight (512 x 128 = 65536 elements, 256 blocks) takes the 8-bit path."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, fin, generator=g)
    y = x @ (torch.randn(fout, fin, generator=g) / fin**0.5).T + 0.1 * torch.randn(n, fout, generator=g)
    model = torch.nn.Linear(fin, fout)
    with torch.no_grad():
        model.weight.copy_(torch.randn(fout, fin, generator=g) / fin**0.5)
        model.bias.copy_(torch.randn(fout, generator=g) * 0.1)
    return model, x, y


def _train(model, x, y, opt, steps):
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    losses.append(torch.nn.functional.mse_loss(model(x).float(), y).item())
    return losses


def test_tracks_torch_adamw():
    ref, x, y = _regression()
    model, _, _ = _regression()
    init = [p.detach().clone() for p in ref.parameters()]
    ref_losses = _train(ref, x, y, torch.optim.AdamW(ref.parameters(), **HP), 50)
    opt = AdamW8bit(model.parameters(), **HP)
    losses = _train(model, x, y, opt, 50)
    assert "exp_avg_codes" in opt.state[model.weight] and "exp_avg" in opt.state[model.bias]  # both paths ran
    # The change each parameter made over 50 steps agrees with AdamW's to 3% (measured ~1.0% weight,
    # ~1.7% bias; bitsandbytes' AdamW8bit measures the same on this problem).
    for p, r, p0 in zip(model.parameters(), ref.parameters(), init):
        assert ((p - p0) - (r - p0)).norm() / (r - p0).norm() < 3e-2
    # The loss falls as far (measured to 0.01%); the brief allows 10%, we hold it to 2%.
    assert abs((losses[0] - losses[-1]) / (ref_losses[0] - ref_losses[-1]) - 1) < 2e-2


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dist", ["normal", "cauchy"])
def test_quantize_error_bounds(signed, dist):
    g = torch.Generator().manual_seed(1)
    n = 100_003  # a partial last block
    x = torch.randn(n, generator=g)
    if dist == "cauchy":  # heavy tails: a few huge entries per block, most entries far below the absmax
        x = x / torch.randn(n, generator=g)
    if not signed:
        x = x * x
    x[::7] = 0.0
    codes, absmax = quantize_blockwise(x, 256, signed)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-n // 256),)
    back = dequantize_blockwise(codes, absmax, 256, signed)
    assert torch.all(back[::7] == 0)  # zeros exact
    scale = absmax.repeat_interleave(256)[:n]
    top = x.abs() == scale
    assert torch.equal(back[top], x[top])  # each block's absmax exact
    # Max error is half the spacing of the top decade: 0.45/64 signed, 0.45/128 unsigned.
    err = (back - x).abs() / scale
    assert err.max() <= (0.45 / 64 if signed else 0.45 / 128) + 1e-6
    # Small entries keep their size: nothing down to 1e-6 (signed) / 1e-7 (unsigned) of the absmax
    # turns into 0, where a linear int8 grid zeroes everything below absmax/254.
    floor = 1e-6 if signed else 1e-7
    assert torch.all(back[x.abs() >= floor * scale] != 0)
    nz = x != 0
    rel = ((back - x).abs() / x.abs())[nz]
    assert rel.median() < (0.02 if dist == "normal" else 0.15)  # measured 1.2%/0.9% normal, 4%/10% cauchy
    # Rounding is to the nearest codebook value (except tiny positive v, rounded up to the smallest code).
    book = _dynamic_codebook(signed)
    normed = x / scale
    best = (normed[:, None] - book[None, :]).abs().min(dim=1).values
    got = (back / scale - normed).abs()
    ok = got <= best + 1e-6
    if not signed:
        ok |= (normed > 0) & (normed < book[1])
    assert torch.all(ok)


def test_small_params_match_torch_adamw_bitwise():
    g = torch.Generator().manual_seed(2)
    init = [torch.randn(16, 32, generator=g), torch.randn(16, generator=g)]  # 512 and 16 < min_8bit_size
    mine = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt, ref_opt = AdamW8bit(mine, **HP), torch.optim.AdamW(ref, foreach=False, **HP)
    for _ in range(10):
        for p, r in zip(mine, ref):
            p.grad = torch.randn(p.shape, generator=g)
            r.grad = p.grad.clone()
        opt.step()
        ref_opt.step()
    for p, r in zip(mine, ref):
        assert torch.equal(p, r)
        assert torch.equal(opt.state[p]["exp_avg_sq"], ref_opt.state[r]["exp_avg_sq"])


def _params_and_grads(seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(70_001, generator=g)),  # 8-bit, partial last block
              torch.nn.Parameter(torch.randn(64, 96, generator=g).to(torch.bfloat16)),  # 8-bit, bf16
              torch.nn.Parameter(torch.randn(100, generator=g))]  # float32 states
    grads = [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(10)]
    return params, grads


def _run(params, opt, grads):
    for step_grads in grads:
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()


def test_state_dict_round_trip_is_bitwise():
    straight, grads = _params_and_grads(3)
    straight_opt = AdamW8bit(straight, **HP)
    _run(straight, straight_opt, grads)

    first, _ = _params_and_grads(3)
    opt = AdamW8bit(first, **HP)
    _run(first, opt, grads[:5])
    saved = opt.state_dict()
    for state in saved["state"].values():  # flat: checkpoints store each entry under name + key
        assert all(isinstance(v, (torch.Tensor, int, float)) for v in state.values())
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in first], "opt": saved}, buf)
    buf.seek(0)
    loaded = torch.load(buf)

    resumed = [torch.nn.Parameter(t.clone()) for t in loaded["params"]]
    opt2 = AdamW8bit(resumed, **HP)
    opt2.load_state_dict(loaded["opt"])
    assert opt2.state[resumed[1]]["exp_avg_absmax"].dtype == torch.float32  # not cast to the bf16 param's dtype
    assert opt2.state[resumed[0]]["exp_avg_codes"].dtype == torch.uint8
    _run(resumed, opt2, grads[5:])
    for a, b in zip(resumed, straight):
        assert torch.equal(a, b)
        for k, v in opt2.state[a].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(straight_opt.state[b][k]))


def test_state_bytes_per_param():
    p = torch.nn.Parameter(torch.zeros(1 << 20))
    opt = AdamW8bit([p])
    p.grad = torch.randn(p.shape)
    opt.step()
    state_bytes = sum(v.numel() * v.element_size() for v in opt.state[p].values() if torch.is_tensor(v))
    assert state_bytes / p.numel() <= 2.1  # 2 + 8/256 = 2.03125
    assert state_bytes == 2 * (1 << 20) + 2 * 4 * (1 << 20) // 256


@pytest.mark.parametrize("numel", [8192, 100])  # 8-bit and float32-state paths
def test_weight_decay_is_decoupled(numel):
    init = torch.randn(numel)
    p, r = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt, ref_opt = AdamW8bit([p], **HP), torch.optim.AdamW([r], foreach=False, **HP)
    for _ in range(3):
        p.grad, r.grad = torch.zeros_like(p), torch.zeros_like(r)
        before = p.detach().clone()
        opt.step()
        ref_opt.step()
        assert torch.equal(p, before * (1 - HP["lr"] * HP["weight_decay"]))
        assert torch.equal(p, r)


def test_non_contiguous_param():
    base = torch.randn(4096, 3)
    p, q = torch.nn.Parameter(base.clone().t()), torch.nn.Parameter(base.clone().t().contiguous())
    assert not p.is_contiguous()
    opt_p, opt_q = AdamW8bit([p], **HP), AdamW8bit([q], **HP)
    for _ in range(3):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
        opt_p.step()
        opt_q.step()
    assert torch.equal(p, q)


def test_bf16_params():
    # The bf16 path is the float32 update rounded once: with the same gradients, states match
    # bitwise and the first step's parameter is the float32 result rounded to bf16.
    g = torch.Generator().manual_seed(4)
    init = torch.randn(128, 96, generator=g)
    p16, p32 = torch.nn.Parameter(init.to(torch.bfloat16)), torch.nn.Parameter(init.to(torch.bfloat16).float())
    opt16, opt32 = AdamW8bit([p16], **HP), AdamW8bit([p32], **HP)
    for step in range(5):
        p16.grad = torch.randn(p16.shape, generator=g).to(torch.bfloat16)
        p32.grad = p16.grad.float()
        opt16.step()
        opt32.step()
        if step == 0:
            assert torch.equal(p16, p32.to(torch.bfloat16))
    assert p16.dtype == torch.bfloat16
    for k, v in opt16.state[p16].items():
        assert torch.equal(torch.as_tensor(v), torch.as_tensor(opt32.state[p32][k]))

    # And a bf16 model trains about as well as float32 AdamW.
    model, x, y = _regression(5, fin=64, fout=512, n=256)
    ref, _, _ = _regression(5, fin=64, fout=512, n=256)
    model.to(torch.bfloat16)
    losses = _train(model, x.to(torch.bfloat16), y, AdamW8bit(model.parameters(), **HP), 30)
    ref_losses = _train(ref, x, y, torch.optim.AdamW(ref.parameters(), **HP), 30)
    assert model.weight.dtype == torch.bfloat16
    assert abs((losses[0] - losses[-1]) / (ref_losses[0] - ref_losses[-1]) - 1) < 5e-2
