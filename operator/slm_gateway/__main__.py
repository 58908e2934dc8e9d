"""``python -m slm_gateway``: see :mod:`slm_gateway.main`."""

from slm_gateway.main import main

if __name__ == "__main__":
    main()
