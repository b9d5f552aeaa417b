"""python -m tunedock.cli"""

from tunedock.cli import main

main()
