"""python -m services.trainer"""

from services.common.server import run_service
from services.trainer.server import build_server
from services.trainer.settings import TrainerSettings

if __name__ == "__main__":
    raise SystemExit(run_service(TrainerSettings, build_server))
