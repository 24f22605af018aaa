"""Weight sync by collective, in one process (each sync-group member a thread, gloo over loopback): the receivers'
weights equal the sender's bit for bit, tied weights travel once, a tensor larger than a bucket goes alone, a wrong
version or a missing weight is refused, and a missing peer fails within the timeout instead of hanging."""

import threading
import time

import pytest
import torch
import torch.distributed as dist

from rollout.weight_sync import (
    SyncAddress,
    SyncGroup,
    SyncPlan,
    load_in_place,
    receive,
    send,
    sync_names,
    sync_targets,
)

from ..conftest import make_policy


def store():
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def run_members(fns):
    """Run each member's function in its own thread; return their results (re-raising the first error)."""
    out, errors = [None] * len(fns), []

    def run(i):
        try:
            out[i] = fns[i]()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(fns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return out


def test_plan_packs_every_tensor_once_and_unpacks_it_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(3, 5, generator=g),
        "big": torch.randn(40, generator=g),  # 160 bytes > the 128-byte bucket: a bucket of its own
        "b": torch.randn(7, generator=g).to(torch.bfloat16),
        "c": torch.arange(3),
    }
    plan = SyncPlan.build(tensors, version=3, bucket_bytes=128)
    assert SyncPlan.from_bytes(plan.to_bytes()) == plan
    assert [m.name for m in plan.tensors] == list(tensors)
    assert plan.tensors[1].offset == 0 and plan.buckets[plan.tensors[1].bucket] == 160
    got = {}
    for i in range(len(plan.buckets)):
        got |= {k: v.clone() for k, v in plan.unpack(i, plan.pack(i, tensors, torch.device("cpu"))).items()}
    assert got.keys() == tensors.keys()
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in tensors.items())


def test_tied_weights_are_named_once():
    policy = make_policy("llama")
    policy.model.config.tie_word_embeddings = True
    policy.model.tie_weights()
    names = sync_names(policy.model)
    assert policy.model.lm_head.weight is policy.model.model.embed_tokens.weight
    assert len([n for n in names if "embed_tokens" in n or "lm_head" in n]) == 1
    assert len(names) == len(set(names))


def test_receivers_hold_the_senders_weights_bit_for_bit():
    src, dst1, dst2 = (make_policy("llama", seed=s) for s in (1, 2, 3))
    s = store()
    address = SyncAddress("127.0.0.1", s.port, "t/", 3, 30.0)
    tensors = {n: t.detach() for n, t in sync_targets(src.model).items()}

    def sender():
        return send(SyncGroup(address, 0), tensors, version=7, bucket_mb=0.05)  # several buckets

    def receiver(policy, rank):
        return lambda: receive(SyncGroup(address, rank), sync_targets(policy.model), version=7)

    (sent, kept), got1, got2 = run_members([sender, receiver(dst1, 1), receiver(dst2, 2)])
    assert kept.tensors().keys() == tensors.keys()  # the sender's host copy of what it sent, bit for bit
    assert all(torch.equal(kept.tensors()[k], v) for k, v in tensors.items())
    assert sent.buckets > 1 and got1.nbytes == got2.nbytes == sent.nbytes
    raw = sum(t.numel() * t.element_size() for t in tensors.values())
    assert raw <= sent.nbytes < raw + 8 * len(tensors)  # every byte once, plus 8-byte alignment
    for dst in (dst1, dst2):
        a, b = src.model.state_dict(), dst.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # the next version: new weights into the old copy's buffers, and the receivers' buffers reused as well
    with torch.no_grad():
        for t in tensors.values():
            t.mul_(-0.5)
    again_at = SyncAddress("127.0.0.1", s.port, "t2/", 3, 30.0)
    g0, g1, g2 = run_members([lambda r=r: SyncGroup(again_at, r) for r in (0, 1, 2)])  # they meet: in threads
    run_members(
        [lambda: send(g0, tensors, 1, 0.05)]
        + [lambda g=g, d=d: receive(g, sync_targets(d.model), 1) for g, d in ((g1, dst1), (g2, dst2))]
    )
    first = [b.data_ptr() for b in g1.buffers]
    (_, again), *_ = run_members(
        [lambda: send(g0, tensors, 2, 0.05, reuse=kept)]
        + [lambda g=g, d=d: receive(g, sync_targets(d.model), 2) for g, d in ((g1, dst1), (g2, dst2))]
    )
    assert [b.data_ptr() for b in again.buckets] == [b.data_ptr() for b in kept.buckets]
    assert [b.data_ptr() for b in g1.buffers] == first
    assert all(torch.equal(again.tensors()[k], v) for k, v in tensors.items())
    for dst in (dst1, dst2):
        a, b = src.model.state_dict(), dst.model.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_receiver_cast_to_its_dtype_and_a_wrong_version_is_refused():
    src, dst = make_policy("llama", seed=1), make_policy("llama", seed=2).to(torch.bfloat16)
    s = store()
    tensors = {n: t.detach().to(torch.bfloat16) for n, t in sync_targets(src.model).items()}
    address = SyncAddress("127.0.0.1", s.port, "cast/", 2, 30.0)
    (sent, _), got = run_members(
        [
            lambda: send(SyncGroup(address, 0), tensors, 1, 1.0),
            lambda: receive(SyncGroup(address, 1), sync_targets(dst.model), 1),
        ]
    )
    assert got.nbytes == sent.nbytes  # bf16 on the wire: half the fp32 bytes
    a, b = src.model.state_dict(), dst.model.state_dict()
    assert all(torch.equal(a[k].to(torch.bfloat16), b[k]) for k in a)

    address = SyncAddress("127.0.0.1", s.port, "version/", 2, 30.0)
    with pytest.raises(RuntimeError, match="expected policy v5, the sender sent v4"):
        run_members(
            [
                lambda: send(SyncGroup(address, 0), tensors, 4, 1.0),
                lambda: receive(SyncGroup(address, 1), sync_targets(dst.model), 5),
            ]
        )


def test_a_missing_weight_is_refused():
    """In place (the object-store path) and over the group: the receiver names the weight, still takes every
    bucket (the sender and other receivers finish), and keeps its own weights."""
    policy, src = make_policy("llama", seed=4), make_policy("llama", seed=5)
    targets = sync_targets(policy.model)
    partial = {k: v.detach() for k, v in list(sync_targets(src.model).items())[1:]}
    with pytest.raises(ValueError, match="missing"):
        load_in_place(targets, partial)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    s = store()
    address = SyncAddress("127.0.0.1", s.port, "partial/", 2, 30.0)
    with pytest.raises(ValueError, match=r"missing \['model.embed_tokens.weight'\]"):
        run_members(
            [
                lambda: send(SyncGroup(address, 0), partial, 3, 0.05),
                lambda: receive(SyncGroup(address, 1), targets, 3),
            ]
        )
    assert all(torch.equal(v, policy.model.state_dict()[k]) for k, v in before.items())


def test_a_lost_peer_fails_within_the_timeout():
    """A group of 3 where one receiver never comes: the sender's rendezvous gives up after the timeout."""
    s = store()
    address = SyncAddress("127.0.0.1", s.port, "lost/", 3, 3.0)
    t0 = time.time()
    with pytest.raises(dist.DistError):
        run_members(
            [
                lambda: SyncGroup(address, 0),
                lambda: SyncGroup(address, 1),
            ]
        )
    assert time.time() - t0 < 30
