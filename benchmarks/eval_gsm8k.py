"""GSM8K 5-shot with piecewise graphs on and off: `python benchmarks/eval_gsm8k.py --help`."""

from tessera.bench.gsm8k import main

if __name__ == "__main__":
    main()
