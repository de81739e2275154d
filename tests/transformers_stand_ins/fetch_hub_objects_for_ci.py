# Stand-in: the sdist lacks utils/; offline, the one Hub fixture the common tests NEPA runs load is a bundled cat photo.
from pathlib import Path

BUNDLED_PHOTOS = Path(__file__).resolve().parents[2] / "src" / "nepa_hf" / "data" / "bundled" / "photos"
LOCAL_FIXTURES = {
    "https://huggingface.co/datasets/hf-internal-testing/fixtures-coco/resolve/main/val2017/000000039769.jpg": str(
        BUNDLED_PHOTOS / "chelsea_cat.jpg"
    ),
}


def url_to_local_path(url, return_url_if_not_found=True):
    return LOCAL_FIXTURES.get(url, url)
