"""MovieLens readers (every format, folder and zip), their errors, and the verified download."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import zipfile
from pathlib import Path

import pyarrow as pa
import pytest

from models.data import DataFormatError, DownloadError, ITEMS_SCHEMA, RATINGS_SCHEMA, download, read_movielens

SHARED_ML = Path(__file__).resolve().parents[2] / "shared/data/movielens/ml-latest-small"

MOVIES_CSV = [
    "movieId,title,genres",
    "1,Toy Story (1995),Adventure|Animation|Children|Comedy|Fantasy",
    '2,"American President, The (1995)",Comedy|Drama|Romance',
    '5,"Dr. Strangelove or: How I Learned to Stop Worrying and Love the Bomb (1964)",Comedy|War',
    '7,"""Great Performances"" Cats (1998)",(no genres listed)',
]
RATINGS_CSV = [
    "userId,movieId,rating,timestamp",
    "1,1,4.0,964982703",
    "1,2,3.5,964981247",
    "2,5,0.5,964982224",
    "2,1,5.0,964983815",
]
TAGS_CSV = (
    [
        "userId,movieId,tag,timestamp",
        "1,1,Pixar,1445714994",
        "2,1,fun,1445714996",
        "3,1,pixar,1445714997",
        '4,2,"politics, satire",1445715000',
    ]
    + [f"{10 + k},5,tag{k:02d},1445715100" for k in range(12)]
    + ["99,5,tag11,1445715200"]
)


def write_lines(path: Path, lines: list[str], encoding: str = "utf-8", eol: str = "\r\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes((eol.join(lines) + eol).encode(encoding))
    return path


def csv_folder(root: Path, ratings=RATINGS_CSV, movies=MOVIES_CSV, tags=TAGS_CSV) -> Path:
    folder = root / "ml-latest-small"
    write_lines(folder / "ratings.csv", ratings)
    write_lines(folder / "movies.csv", movies)
    if tags is not None:
        write_lines(folder / "tags.csv", tags)
    return folder


def zip_folder(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w") as z:
        for f in sorted(folder.iterdir()):
            z.write(f, f"{folder.name}/{f.name}")
    return dest


def dat_folder(root: Path, ratings: list[str] | None = None) -> Path:
    folder = root / "ml-1m"
    write_lines(
        folder / "movies.dat",
        [
            "1::Toy Story (1995)::Animation|Children's|Comedy",
            "2::Jumanji (1995)::Adventure|Children's|Fantasy",
            "3::Misérables, Les (1995)::Drama|Musical",
        ],
        encoding="latin-1",
        eol="\n",
    )
    write_lines(
        folder / "ratings.dat", ratings or ["1::1::5::978300760", "1::3::3::978302109", "2::2::4::978301968"], eol="\n"
    )
    return folder


def ml100k_folder(root: Path, data: list[str] | None = None) -> Path:
    folder = root / "ml-100k"
    names = [
        "unknown",
        "Action",
        "Adventure",
        "Animation",
        "Children's",
        "Comedy",
        "Crime",
        "Documentary",
        "Drama",
        "Fantasy",
        "Film-Noir",
        "Horror",
        "Musical",
        "Mystery",
        "Romance",
        "Sci-Fi",
        "Thriller",
        "War",
        "Western",
    ]
    write_lines(folder / "u.genre", [f"{n}|{i}" for i, n in enumerate(names)] + [""], eol="\n")

    def flags(*on):
        return "|".join("1" if n in on else "0" for n in names)

    write_lines(
        folder / "u.item",
        [
            f"1|Toy Story (1995)|01-Jan-1995||http://us.imdb.com/M/title-exact?Toy%20Story%20(1995)|"
            f"{flags('Animation', 'Children', 'Comedy')}",
            f"2|GoldenEye (1995)|01-Jan-1995||http://x|{flags('Action', 'Adventure', 'Thriller')}",
            f"3|Café au lait (1994)|01-Jan-1994||http://x|{flags('unknown')}",
        ],
        encoding="latin-1",
        eol="\n",
    )
    write_lines(
        folder / "u.data", data or ["196\t1\t3\t881250949", "186\t2\t3\t891717742", "196\t3\t1\t878887116"], eol="\n"
    )
    return folder


# ---- the formats ----------------------------------------------------------------------------


def test_csv_folder(tmp_path):
    raw = read_movielens(csv_folder(tmp_path))
    assert raw.name == "ml-latest-small"
    assert raw.items.schema == ITEMS_SCHEMA and raw.ratings.schema == RATINGS_SCHEMA
    items = {r["source_id"]: r for r in raw.items.to_pylist()}
    assert items["2"]["title"] == "American President, The (1995)"
    assert items["7"]["title"] == '"Great Performances" Cats (1998)'
    assert items["7"]["genres"] == []
    assert items["1"]["genres"] == ["Adventure", "Animation", "Children", "Comedy", "Fantasy"]
    # distinct, lower-cased, most frequent first (ties keep first-seen order), at most 10
    assert items["1"]["tags"] == ["pixar", "fun"]
    assert items["2"]["tags"] == ["politics, satire"]
    assert items["5"]["tags"] == ["tag11"] + [f"tag{k:02d}" for k in range(9)]
    assert raw.ratings.to_pydict() == {
        "user": ["1", "1", "2", "2"],
        "item": ["1", "2", "5", "1"],
        "rating": [4.0, 3.5, 0.5, 5.0],
        "timestamp": [964982703, 964981247, 964982224, 964983815],
    }


def test_csv_without_tags(tmp_path):
    raw = read_movielens(csv_folder(tmp_path, tags=None))
    assert all(t == [] for t in raw.items.column("tags").to_pylist())


def test_zip_archive(tmp_path):
    archive = zip_folder(csv_folder(tmp_path / "src"), tmp_path / "ml-latest-small.zip")
    from_zip = read_movielens(archive)
    from_dir = read_movielens(tmp_path / "src" / "ml-latest-small")
    assert from_zip.name == "ml-latest-small"
    assert from_zip.items.equals(from_dir.items) and from_zip.ratings.equals(from_dir.ratings)


def test_dat_latin1_with_tags(tmp_path):
    folder = dat_folder(tmp_path)
    write_lines(folder / "tags.dat", ["15::2::Board Game::1215184630", "20::2::board game::1215184631"], eol="\n")
    raw = read_movielens(folder, name="ml-1m")
    items = {r["source_id"]: r for r in raw.items.to_pylist()}
    assert items["3"]["title"] == "Misérables, Les (1995)"
    assert items["1"]["genres"] == ["Animation", "Children's", "Comedy"]
    assert items["2"]["tags"] == ["board game"]
    assert raw.ratings.column("rating").to_pylist() == [5.0, 3.0, 4.0]
    assert raw.ratings.column("item").to_pylist() == ["1", "3", "2"]


def test_ml100k(tmp_path):
    raw = read_movielens(ml100k_folder(tmp_path))
    assert raw.name == "ml-100k"
    items = {r["source_id"]: r for r in raw.items.to_pylist()}
    assert items["2"]["genres"] == ["Action", "Adventure", "Thriller"]
    assert items["3"]["genres"] == []  # 'unknown' means no genre
    assert items["3"]["title"] == "Café au lait (1994)"
    assert raw.ratings.to_pydict()["user"] == ["196", "186", "196"]


def test_real_ml_latest_small():
    if not SHARED_ML.is_dir():
        pytest.skip(f"{SHARED_ML} is not present")
    raw = read_movielens(SHARED_ML)
    assert raw.ratings.num_rows == 100836
    assert len(pa.compute.unique(raw.ratings.column("user"))) == 610
    assert len(pa.compute.unique(raw.ratings.column("item"))) == 9724


# ---- bad input: file, line and reason in every message ---------------------------------------


def bad_rating_row(row: str, line: int = 3):
    rows = list(RATINGS_CSV)
    rows[line - 1] = row
    return rows


@pytest.mark.parametrize(
    "rows, line, reason",
    [
        (bad_rating_row("1,2,3.5"), 3, "expected 4 fields, got 3"),
        (bad_rating_row("1,2,abc,964981247"), 3, "rating 'abc' is not a number"),
        (bad_rating_row("1,x2,3.5,964981247", line=4), 4, "movieId 'x2' is not an integer"),
        (bad_rating_row("1,2,7.0,964981247", line=5), 5, "rating 7.0 is out of range"),
        (bad_rating_row("1,2,3.5,96498.5"), 3, "timestamp '96498.5' is not an integer"),
        (bad_rating_row("1,42,3.5,964981247", line=4), 4, "movieId 42 is not in movies.csv"),
        (bad_rating_row("1,2,,964981247"), 3, "rating '' is not a number"),
    ],
)
def test_bad_ratings_csv(tmp_path, rows, line, reason):
    with pytest.raises(DataFormatError) as err:
        read_movielens(csv_folder(tmp_path, ratings=rows))
    assert str(err.value).startswith(f"ratings.csv line {line}: ")
    assert reason in str(err.value)
    assert err.value.file == "ratings.csv" and err.value.line == line


def test_bad_row_after_blank_lines_keeps_line_number(tmp_path):
    rows = RATINGS_CSV[:2] + ["", ""] + ["1,2,abc,964981247"]
    with pytest.raises(DataFormatError, match=r"ratings.csv line 5: rating 'abc' is not a number"):
        read_movielens(csv_folder(tmp_path, ratings=rows))


def test_bad_movie_row(tmp_path):
    movies = MOVIES_CSV + ["8,Heat (1995)"]
    with pytest.raises(DataFormatError, match=r"movies.csv line 6: expected 3 fields, got 2"):
        read_movielens(csv_folder(tmp_path, movies=movies))
    movies = MOVIES_CSV + ["1,Toy Story again (1995),Comedy"]
    with pytest.raises(DataFormatError, match=r"movies.csv line 6: movieId 1 appears twice"):
        read_movielens(csv_folder(tmp_path, movies=movies))


def test_bad_tag_row(tmp_path):
    tags = TAGS_CSV[:3] + ["3,1000,pixar,1445714997"]
    with pytest.raises(DataFormatError, match=r"tags.csv line 4: movieId 1000 is not in movies.csv"):
        read_movielens(csv_folder(tmp_path, tags=tags))


@pytest.mark.parametrize("which", ["ratings.csv", "movies.csv"])
def test_empty_file(tmp_path, which):
    folder = csv_folder(tmp_path)
    (folder / which).write_bytes(b"")
    with pytest.raises(DataFormatError, match=rf"{which} line 1: file is empty"):
        read_movielens(folder)


def test_header_only_ratings(tmp_path):
    with pytest.raises(DataFormatError, match=r"ratings.csv line 2: no ratings in the file"):
        read_movielens(csv_folder(tmp_path, ratings=RATINGS_CSV[:1]))


def test_wrong_header(tmp_path):
    with pytest.raises(DataFormatError, match=r"ratings.csv line 1: expected the header"):
        read_movielens(csv_folder(tmp_path, ratings=["user,item,rating,time"] + RATINGS_CSV[1:]))


def test_bad_dat_rows(tmp_path):
    with pytest.raises(DataFormatError, match=r"ratings.dat line 2: Rating '4x' is not a number"):
        read_movielens(dat_folder(tmp_path / "a", ["1::1::5::978300760", "1::3::4x::978302109"]))
    with pytest.raises(DataFormatError, match=r"ratings.dat line 1: expected 4 fields, got 3"):
        read_movielens(dat_folder(tmp_path / "b", ["1::1::5:978300760"]))
    with pytest.raises(DataFormatError, match=r"ratings.dat line 3: MovieID 9 is not in movies.dat"):
        read_movielens(dat_folder(tmp_path / "c", ["1::1::5::1", "1::2::5::2", "1::9::5::3"]))


def test_bad_u_data(tmp_path):
    with pytest.raises(DataFormatError, match=r"u.data line 2: rating 0 is out of range"):
        read_movielens(ml100k_folder(tmp_path, ["196\t1\t3\t881250949", "186\t2\t0\t891717742"]))


def test_wrong_folder(tmp_path):
    write_lines(tmp_path / "stuff" / "readme.txt", ["hello"])
    with pytest.raises(DataFormatError, match=r"stuff: no MovieLens files found"):
        read_movielens(tmp_path / "stuff")
    write_lines(tmp_path / "half" / "ratings.csv", RATINGS_CSV)
    with pytest.raises(DataFormatError, match=r"half: has ratings.csv but no movies.csv"):
        read_movielens(tmp_path / "half")


def test_wrong_archive(tmp_path):
    archive = tmp_path / "other.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("other/readme.txt", "not movielens")
    with pytest.raises(DataFormatError, match=r"other.zip: no MovieLens files found"):
        read_movielens(archive)
    not_zip = tmp_path / "fake.zip"
    not_zip.write_text("this is not a zip")
    with pytest.raises(DataFormatError, match=r"fake.zip: not a zip archive"):
        read_movielens(not_zip)


def test_bad_row_inside_zip_names_member(tmp_path):
    folder = csv_folder(tmp_path / "src", ratings=bad_rating_row("1,2,abc,964981247"))
    archive = zip_folder(folder, tmp_path / "ml-latest-small.zip")
    with pytest.raises(
        DataFormatError,
        match=r"ml-latest-small.zip:ml-latest-small/ratings.csv "
        r"line 3: rating 'abc' is not a number",
    ):
        read_movielens(archive)


# ---- download -------------------------------------------------------------------------------


@pytest.fixture
def served(tmp_path):
    """A folder served over loopback by http.server; yields (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verified(tmp_path, served):
    root, base = served
    payload = b"PK fake archive " * 5000
    (root / "ml-test.zip").write_bytes(payload)
    dest = tmp_path / "dl"
    path = download(
        "ml-test", dest, url=f"{base}/ml-test.zip", sha256=hashlib.sha256(payload).hexdigest(), progress=False
    )
    assert path == dest / "ml-test.zip" and path.read_bytes() == payload
    assert sorted(p.name for p in dest.iterdir()) == ["ml-test.zip"]
    # already there and verified: returned without a request
    (root / "ml-test.zip").unlink()
    assert (
        download("ml-test", dest, url=f"{base}/ml-test.zip", sha256=hashlib.sha256(payload).hexdigest(), progress=False)
        == path
    )


def test_download_checksum_mismatch_leaves_nothing(tmp_path, served):
    root, base = served
    (root / "ml-test.zip").write_bytes(b"tampered")
    dest = tmp_path / "dl"
    with pytest.raises(DownloadError, match="SHA-256 mismatch"):
        download("ml-test", dest, url=f"{base}/ml-test.zip", sha256="0" * 64, progress=False)
    assert list(dest.iterdir()) == []


def test_download_http_error_and_no_network(tmp_path, served):
    _, base = served
    with pytest.raises(DownloadError, match="HTTP 404"):
        download("missing", tmp_path / "dl", url=f"{base}/missing.zip", progress=False)
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as err:
        download("ml-test", tmp_path / "dl", url=f"http://127.0.0.1:{port}/x.zip", progress=False)
    assert "cannot download" in str(err.value) and "\n" not in str(err.value)
    assert list((tmp_path / "dl").iterdir()) == []


def test_download_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="unknown MovieLens dataset"):
        download("ml-7b", tmp_path)
