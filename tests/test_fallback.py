"""Without the compiled extension the library works through the reference and warns once."""
import subprocess
import sys
import textwrap


def test_missing_extension_falls_back_with_one_warning():
    script = textwrap.dedent("""
        import sys, warnings
        import importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "weightablate._C":
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import torch
        from torch import nn
        import weightablate as wa
        assert wa.ops.compiled_backends() == [], wa.ops.compiled_backends()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        X, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            r1 = wa.ablate(model, "0", (X, y))
            r2 = wa.ablate(model, "0", (X, y))
        msgs = [str(w.message) for w in caught if "compiled extension" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert r1.backend == "torch" and r2.backend == "torch"
        ref = wa.ablate(model, "0", (X, y), backend="naive", precision="float64")
        assert torch.allclose(r1.delta_loss, ref.delta_loss, rtol=1e-4, atol=1e-7)
        try:
            wa.ablate(model, "0", (X, y), backend="cpu")
        except RuntimeError as exc:
            assert "cpu" in str(exc) and "blocked" in str(exc)
        else:
            raise AssertionError("backend='cpu' without the extension must raise")
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("OK")
