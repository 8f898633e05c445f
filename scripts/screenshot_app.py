"""Screenshot of the web demo (`app.py`) after it reported on a real chest X-ray, for the README.

Starts `python app.py --model <checkpoint> --port <free port>` as a subprocess, opens the page in headless Chromium
driven by Selenium, uploads the image, clicks Generate, waits for the report and the heatmaps, and saves a
screenshot of the whole page.

Needs Chromium and its WebDriver (Debian: `apt-get install -y chromium chromium-driver`) and Selenium
(`pip install selenium`; not a dependency of the project). The default image is an NIH ChestX-ray14 frontal film
from `../shared/data/cxr_images/torchxrayvision_test_images/` (see its PROVENANCE.md).

    python scripts/screenshot_app.py --model outputs/demo --output docs/app_screenshot.png
    python scripts/screenshot_app.py --image frontal.png lateral.dcm
"""

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


REPOSITORY = Path(__file__).resolve().parents[1]
DEFAULT_IMAGE = (
    REPOSITORY.parent / "shared" / "data" / "cxr_images" / "torchxrayvision_test_images" / "00000001_000.png"
)
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
INSTALL_HINT = "Install them with `apt-get install -y chromium chromium-driver` and `pip install selenium`."


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_server(url: str, server: subprocess.Popen, timeout: float) -> None:
    """Poll `url` until it answers; raise `RuntimeError` if the server exits or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"app.py exited with status {server.returncode} before serving.")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1.0)
    raise RuntimeError(f"app.py did not answer at {url} within {timeout:.0f} s.")


def start_browser(width: int, height: int):
    """Headless Chromium through Selenium and the Debian chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--hide-scrollbars"):  # fmt: skip
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def screenshot_report(url: str, images: list[Path], output: Path, width: int, timeout: float) -> str:
    """
    Upload `images` on the page at `url`, click Generate, wait for the report and heatmaps, save the screenshot.

    Returns:
        `str`: the report shown on the page.
    """
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = start_browser(width, 1000)
    try:
        browser.get(url)
        wait = WebDriverWait(browser, timeout)
        upload = wait.until(lambda driver: driver.find_element(By.CSS_SELECTOR, "#views input[type=file]"))
        upload.send_keys("\n".join(str(image.resolve()) for image in images))
        names = {image.name for image in images}

        def files_listed(driver) -> bool:
            """The upload is done when the component lists every file by name."""
            cells = driver.find_elements(By.CSS_SELECTOR, "#views td.filename")
            return names <= {cell.get_attribute("aria-label") for cell in cells}

        wait.until(files_listed)
        browser.find_element(By.ID, "generate").click()
        report = wait.until(
            lambda driver: driver.find_element(By.CSS_SELECTOR, "#report textarea").get_attribute("value")
        )
        wait.until(
            lambda driver: driver.execute_script(
                "const images = document.querySelectorAll('#heatmaps img');"
                "return images.length > 0 && [...images].every(image => image.complete && image.naturalWidth > 0);"
            )
        )
        for close in browser.find_elements(By.CSS_SELECTOR, "[data-testid=toast-close]"):  # warnings shown as toasts
            close.click()
        # Grow the window until the whole page fits in its viewport (the window also holds the browser's own bars)
        for _ in range(5):
            time.sleep(1.0)
            page_height, viewport_height, window_height = browser.execute_script(
                "return [document.documentElement.scrollHeight, window.innerHeight, window.outerHeight];"
            )
            if page_height <= viewport_height:
                break
            browser.set_window_size(width, window_height + page_height - viewport_height)
        output.parent.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(output))
        return report
    finally:
        browser.quit()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="outputs/demo", help="The checkpoint the app loads.")
    parser.add_argument("--image", nargs="+", type=Path, default=[DEFAULT_IMAGE], help="The study's views.")
    parser.add_argument("--output", type=Path, default=REPOSITORY / "docs" / "app_screenshot.png")
    parser.add_argument("--width", type=int, default=1400, help="Browser width in pixels.")
    parser.add_argument("--timeout", type=float, default=300.0, help="Longest wait for the server and the report (s).")
    args = parser.parse_args(argv)
    try:
        import selenium  # noqa: F401
    except ImportError:
        print(f"screenshot_app.py: Selenium is not installed. {INSTALL_HINT}", file=sys.stderr)
        return 1
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not Path(path).is_file()]
    if missing:
        print(f"screenshot_app.py: {', '.join(missing)} not found. {INSTALL_HINT}", file=sys.stderr)
        return 1
    if not Path(args.model).is_dir():
        print(f"screenshot_app.py: no checkpoint at {args.model} (`python train.py` writes outputs/demo).",
              file=sys.stderr)  # fmt: skip
        return 1
    if missing_images := [str(image) for image in args.image if not image.is_file()]:
        print(f"screenshot_app.py: image(s) not found: {', '.join(missing_images)}", file=sys.stderr)
        return 1

    port = free_port()
    environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(REPOSITORY / "app.py"), "--model", str(args.model), "--port", str(port)]
    server = subprocess.Popen(command, cwd=REPOSITORY, env=environment)
    try:
        url = f"http://127.0.0.1:{port}/"
        wait_for_server(url, server, args.timeout)
        report = screenshot_report(url, args.image, args.output, args.width, args.timeout)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"Report on the page: {report}\nScreenshot: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["free_port", "main", "screenshot_report", "start_browser", "wait_for_server"]
