"""Installs the pipeline locally and on Dataflow workers (`--setup_file ./setup.py`)."""

import setuptools

# Verified to install and pass the tests together on Python 3.11.
REQUIRED = [
    'apache-beam[gcp,aws]==2.77.0',  # gs:// and s3:// FileSystems
    'boto3==1.44.8',
    'tensorflow==2.21.0',
    'tensorflow-hub==0.16.1',
    'tfx-bsl==1.21.0',
    'pillow==12.3.0',
    # libjpeg-turbo with tf.io.decode_jpeg's settings: decoding without TensorFlow (no GPU).
    'simplejpeg==1.9.0',
    'google-cloud-storage==3.17.1',
    'faiss-cpu==1.15.1',  # the neighbour index and k-means for duplicates
    'threadpoolctl==3.6.0',  # one BLAS thread while exact search's readers decode
    'pylance==14.0.2',
    'orjson==3.13.0',  # Vertex AI's JSON lines straight from float32 vectors (Beam[gcp] has it)  # the collection: one versioned Lance table (collection/)
    # Contact sheet labels (embeddings/sheet.py), each character in the first font that has it:
    # Noto Sans, Noto Sans for 19 other scripts, Noto Sans Symbols and Noto Emoji (SIL OFL 1.1).
    'manimgx-fonts==2026.9.26.post1',
    'manimgx-fonts-cjk==2026.9.26.post1',  # Noto Sans CJK (Japanese, Chinese, Korean; 33 MB)
    # pnasnet-embeddings browse: the local web page (FastAPI on uvicorn, Jinja2 pages, uploads)
    'fastapi==0.163.2',
    'starlette==1.10.0',
    'uvicorn==0.54.0',
    'jinja2==3.1.6',
    'python-multipart==0.0.34',
    # tensorflow_hub 0.16 imports pkg_resources, which setuptools 81 removed.
    'setuptools==80.9.0',
]

# The export's targets (pnasnet-embeddings export; docs/exporting.md): `pip install -e ".[export]"`.
EXPORT = [
    'psycopg[binary]==3.3.9',  # pgvector through PostgreSQL's binary COPY
    'pymilvus==2.6.17',  # Milvus's client (Beam 2.77's milvus extra asks for pymilvus < 3)
    'milvus-lite==3.2.2',  # a Milvus in-process from a .db file
    'qdrant-client==1.20.0',  # Qdrant's client, and its local mode
]

TEST = [
    'pytest==9.2.0',
    'pytest-xdist==3.8.0',  # two test processes (pytest.ini)
    'hypothesis==6.170.29',  # the collection's model-based test
    'gcp-storage-emulator==2026.7.19',
    'moto[server]==5.2.5',  # a local S3-protocol server for the s3:// tests
    'duckdb==2.0.1',  # reads the Parquet outputs as a warehouse would
    'selenium==4.51.0',  # Debian's Chromium for the browse page (4.52.0: certifi>=2026.10.23)
] + EXPORT + [
    'pgserver==0.1.4',  # a real PostgreSQL 16 with pgvector 0.6.2 for the export's tests
]

setuptools.setup(
    name='pnasnet-embeddings',
    version='0.2.0',
    description='PNASNet-5 Large image embeddings at scale with Apache Beam',
    python_requires='>=3.10,<3.13',
    packages=setuptools.find_packages(include=['commands', 'pipeline', 'jobs', 'transforms',
                                               'embeddings', 'collection', 'models', 'storage', 'run_format',
                                               'pnasnet']),
    package_data={'embeddings': ['templates/*.html']},  # the browse page
    install_requires=REQUIRED,
    extras_require={'test': TEST, 'export': EXPORT},
    entry_points={'console_scripts': ['pnasnet-embeddings = commands.cli:run']},
)
