"""python -m services.inference"""

from services.common.server import run_service
from services.inference.server import build_server
from services.inference.settings import InferenceSettings

if __name__ == "__main__":
    raise SystemExit(run_service(InferenceSettings, build_server))
