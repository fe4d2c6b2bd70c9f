"""How long a step keeps retrying an object store that does not answer, per `object_store.retry_attempts`.

Times one request (pyarrow's S3 filesystem, as every step makes it) against a closed port on 127.0.0.1
until it gives up; the waits between attempts are pyarrow's AWS standard strategy (doubling, at most
20 s each, with random jitter, hence three tries each). Run:

    python <this folder>/object_store_retries.py 4 6 8 10
"""

import sys
import time

from zhclip.components.core.storage import ObjectStoreConfig, arrow_filesystem


def seconds_to_give_up(attempts: int) -> float:
    policy = ObjectStoreConfig(retry_attempts=attempts)
    filesystem, path = arrow_filesystem("s3://bucket/key", "http://127.0.0.1:9", policy)
    started = time.perf_counter()
    try:
        filesystem.get_file_info(path)
    except OSError:
        return time.perf_counter() - started
    raise RuntimeError("something answered on 127.0.0.1:9")


if __name__ == "__main__":
    for attempts in map(int, sys.argv[1:] or ["6"]):
        tries = [seconds_to_give_up(attempts) for _ in range(3)]
        print(f"retry_attempts={attempts}: gave up after " + ", ".join(f"{s:.1f}" for s in tries) + " s", flush=True)
