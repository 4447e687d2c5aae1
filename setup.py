from setuptools import find_packages, setup

setup(
    name="signal_srv",
    version="0.1.0",
    description="WebRTC signaling server for many concurrent 1:1 calls, on Tornado",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.11",
    packages=find_packages(include=["signal_srv", "signal_srv.*"]),
    package_data={"signal_srv": ["static/*", "openapi.json"], "signal_srv.cluster": ["lua/*.lua"]},
    install_requires=["tornado>=6.4", "prometheus_client>=0.17", "PyJWT[crypto]>=2.10", "cryptography>=3.4",
                      "redis>=5"],
    extras_require={
        "fast": ["uvloop>=0.17"],  # event_loop=auto picks it up
        "test": [
            "uvloop>=0.17",  # the suite runs on both loops (SIGNAL_SRV_TEST_LOOP=uvloop)
            "pytest>=8,<9",  # schemathesis' pytest plugin breaks under pytest 9
            "pytest-tornasync>=0.6",
            "time-machine>=2.10",
            "hypothesis>=6.100",
            "schemathesis>=4.0",
            "jsonschema>=4.18",
            "referencing>=0.28",  # tests/test_openapi.py resolves the document's $refs with it
            "openapi-spec-validator>=0.7",
            "websocket-client>=1.7",
            "playwright>=1.45",
            "aiortc>=1.9",
            "aioice>=0.9",  # tests/e2e/test_aiortc.py keeps ICE on 127.0.0.1 through aioice.ice
        ],
    },
    entry_points={
        "console_scripts": [
            "signal-srv = signal_srv.server:main",
            "signal-srv-stress = signal_srv.stress:main",
            "signal-srv-bench = signal_srv.bench:main",
            "signal-srv-token = signal_srv.tokens:main",
        ],
    },
)
