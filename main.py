"""Train, validate, test or predict with MoSLD adapters: ``python main.py fit --config configs/mosld.yaml``."""

from mosld.training.cli import end_distributed, main

if __name__ == "__main__":
    main()
    end_distributed()
