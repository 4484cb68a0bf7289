"""`python -m converge.identity`: runs the identity service until SIGTERM."""

from converge.identity.app import SPEC
from converge.identity.settings import IdentitySettings
from converge.runtime.server import main

if __name__ == "__main__":
    main(SPEC, IdentitySettings)
