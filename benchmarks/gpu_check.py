"""`python -m benchmarks.gpu_check --out DIR` from the repository root: pyllm/benchmarks/gpu_check.py."""

from pyllm.benchmarks.gpu_check import main

if __name__ == "__main__":
    main()
