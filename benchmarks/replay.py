"""Images/s of replay-pool building, each against a reference measured in the same run.

    python benchmarks/replay.py

1. BigGAN (`benchmarks/replay_gan.py`): pool building with batched sampling (8, 32) vs one image at a time.
2. Flickr crawl (`benchmarks/replay_web.py`): 4 and 8 concurrent downloads vs one at a time, against the local
   stand-in with 20 ms latency per photo.
Run either script alone for its options.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import replay_gan  # noqa: E402
import replay_web  # noqa: E402

if __name__ == "__main__":
    sys.argv = sys.argv[:1]
    print("== BigGAN pool building: batch size vs one at a time ==")
    replay_gan.main()
    print("\n== Flickr crawl: concurrent downloads vs sequential ==")
    replay_web.main()
