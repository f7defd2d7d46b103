"""vLLM offline engine: runs only where vllm and a GPU are present."""

import pytest

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_vllm_generates_and_scores_like_hf(parrot7):
    from accord.config import TeacherConfig
    from accord.teachers.base import Request, SamplingParams
    from accord.teachers.hf import HFGenerator
    from accord.teachers.vllm import VLLMGenerator

    cfg = TeacherConfig(name="v", backend="vllm", model=str(parrot7), dtype="float32",
                        vllm_args={"gpu_memory_utilization": 0.2, "enforce_eager": True})
    v, h = VLLMGenerator(cfg), HFGenerator(TeacherConfig(name="h", model=str(parrot7)))
    r = [Request("What is 3+4?")]
    p = SamplingParams(temperature=0, max_new_tokens=40, logprobs=True)
    gv, gh = v.generate(r, p)[0], h.generate(r, p)[0]
    assert gv.text == gh.text
    sv, sh = v.score(r, [gh.text])[0], h.score(r, [gh.text])[0]
    assert torch.allclose(torch.tensor(sv), torch.tensor(sh), atol=1e-3)
