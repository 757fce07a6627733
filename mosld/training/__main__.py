"""``python -m mosld.training fit|validate|test|predict ...``: the same CLI as ``python main.py``."""

from .cli import end_distributed, main

if __name__ == "__main__":
    main()
    end_distributed()
