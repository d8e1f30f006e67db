"""The knowledge base on the sample shop (Lumen & Loom): chunking, BM25 retrieval of held-out questions,
out-of-scope questions declined, PDF and text files, grounded answers with citations from the real model."""
import pytest

from mmchat.chat.knowledge import DONT_KNOW, KnowledgeBase, answer, chunk_markdown, sample_dir
from mmchat.errors import MMChatError

# Questions written apart from the documents (other words than theirs where a customer would use them), with
# the file and section that answers each.
HELD_OUT = [
    ("How many days do I have to send an item back?", "returns.md", "Return window"),
    ("Can I return something I bought on sale?", "returns.md", "Return window"),
    ("Where do I get a return label?", "returns.md", "How to return an item"),
    ("When will my refund arrive?", "returns.md", "Refunds"),
    ("Do you refund the shipping costs?", "returns.md", "Refunds"),
    ("I want a different colour, can I exchange it?", "returns.md", "Exchanges"),
    ("How long does standard delivery take?", "shipping.md", "Delivery times"),
    ("Is shipping free above some amount?", "shipping.md", "Shipping costs"),
    ("How much is express shipping?", "shipping.md", "Shipping costs"),
    ("Do you deliver to Switzerland?", "shipping.md", "International shipping"),
    ("Who pays customs duties?", "shipping.md", "International shipping"),
    ("My parcel has not arrived, where is the tracking link?", "shipping.md", "Tracking a parcel"),
    ("How long is the warranty on a lamp?", "warranty.md", "Warranty period"),
    ("Does the warranty cover accidents?", "warranty.md", "What the warranty covers"),
    ("How do I make a warranty claim?", "warranty.md", "Making a warranty claim"),
    ("Can I pay by invoice?", "payment.md", "Payment methods"),
    ("Do you take Mastercard or PayPal?", "payment.md", "Payment methods"),
    ("When is my card charged?", "payment.md", "When you are charged"),
    ("Where can I download my invoice?", "payment.md", "Invoices"),
    ("What are your opening hours on Saturday?", "contact.txt", ""),
    ("What is your phone number?", "contact.txt", ""),
    ("Can I pick up my order at the showroom?", "contact.txt", ""),
]
OUT_OF_SCOPE = ["What is the capital of France?", "Who won the football world cup in 2014?",
                "Can you recommend a good pizza recipe?", "How do I reset my router?", "Tell me a joke",
                "What is the meaning of life?", "How tall is Mount Everest?", "Write me a poem about cats"]


@pytest.fixture(scope="module")
def kb():
    k = KnowledgeBase.sample()
    yield k
    k.close()


def _hit(passage, file, section):
    return passage.source.endswith(file) and section in passage.heading


def test_sample_kb_is_chunked_by_headings(kb):
    docs = {d["source"].rsplit("/", 1)[-1]: d for d in kb.documents()}
    assert set(docs) == {"returns.md", "shipping.md", "warranty.md", "payment.md", "contact.txt"}
    assert docs["returns.md"]["title"] == "Returns and refunds" and docs["returns.md"]["chunks"] == 4
    title, chunks = chunk_markdown("# Top\nintro\n\n## A\none\n\ntwo\n### A1\nthree\n```\n# not a heading\n```\n")
    assert title == "Top"
    assert [c.heading for c in chunks] == ["Top", "Top > A", "Top > A > A1"]
    assert chunks[1].text == "one\ntwo" and "# not a heading" in chunks[2].text


def test_held_out_questions_retrieve_the_right_passage(kb):
    top1 = sum(bool(r) and _hit(r[0], f, s) for q, f, s in HELD_OUT for r in [kb.retrieve(q, 3)])
    top3 = sum(any(_hit(p, f, s) for p in kb.retrieve(q, 3)) for q, f, s in HELD_OUT)
    print(f"\nretrieval hit rate on {len(HELD_OUT)} held-out questions: top-1 {top1 / len(HELD_OUT):.0%}, "
          f"top-3 {top3 / len(HELD_OUT):.0%}")
    assert top1 / len(HELD_OUT) >= 0.75
    assert top3 / len(HELD_OUT) >= 0.9


def test_out_of_scope_questions_find_nothing(kb):
    for q in OUT_OF_SCOPE:
        assert kb.retrieve(q) == [], q


def test_add_is_idempotent_and_replaces_changed_files(tmp_path):
    doc = tmp_path / "faq.md"
    doc.write_text("# FAQ\n\n## Gift wrapping\n\nWe wrap gifts in recycled paper for 3 EUR.\n")
    k = KnowledgeBase(tmp_path / "kb.db")
    assert k.add(tmp_path) == [(str(doc.resolve()), 1)]
    assert k.add(doc) == [(str(doc.resolve()), 1)]
    assert len(k.search("gift wrapping")) == 1
    doc.write_text("# FAQ\n\n## Gift wrapping\n\nGift wrapping is free in December.\n")
    k.add(doc)
    hits = k.search("gift wrapping")
    assert len(hits) == 1 and "December" in hits[0].text
    assert k.remove(doc) and k.search("gift wrapping") == []
    with pytest.raises(MMChatError, match="does not exist"):
        k.add(tmp_path / "missing")
    (tmp_path / "x.docx").write_bytes(b"PK")
    with pytest.raises(MMChatError, match="indexes"):
        k.add(tmp_path / "x.docx")
    assert k.search('"; DROP TABLE chunks; --') == [] and k.search("NEAR(gift AND)") == []  # no FTS5 syntax


def _write_pdf(path, lines):
    """A one-page PDF with these text lines (Helvetica), the cross-reference table at the right offsets."""
    text = "BT /F1 12 Tf 72 720 Td 16 TL " + " ".join(
        f"({line.replace('(', '[').replace(')', ']')}) Tj T*" for line in lines) + " ET"
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", "<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               "/Resources << /Font << /F1 5 0 R >> >> >>",
               f"<< /Length {len(text)} >>\nstream\n{text}\nendstream",
               "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{obj}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(out)


def test_pdf_and_text_files(tmp_path):
    _write_pdf(tmp_path / "gift-cards.pdf", ["Gift cards", "Gift cards are valid for three years.",
                                              "They can be used online and in the showroom."])
    (tmp_path / "notes.txt").write_text("Loyalty points\n\nEvery euro spent earns one loyalty point.\n")
    k = KnowledgeBase()
    added = dict(k.add(tmp_path))
    assert added[str((tmp_path / "gift-cards.pdf").resolve())] == 1
    hit = k.retrieve("How long are gift cards valid?")[0]
    assert hit.source.endswith("gift-cards.pdf") and hit.heading == "page 1" and "three years" in hit.text
    assert k.retrieve("loyalty points per euro")[0].source.endswith("notes.txt")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    with pytest.raises(MMChatError, match="PDF"):
        k.add(tmp_path / "broken.pdf")


@pytest.mark.slow
def test_answers_cite_the_right_passage_and_decline_out_of_scope(smollm2, kb):
    for q, f, s in [HELD_OUT[3], HELD_OUT[9], HELD_OUT[16]]:
        a = answer(smollm2, kb, q, seed=0)
        assert not a.declined and a.cited
        assert any(_hit(a.passages[i - 1], f, s) for i in a.cited), (q, a.text, a.sources)
        assert a.text.strip()
    for q in OUT_OF_SCOPE[:3]:
        a = answer(smollm2, kb, q, seed=0)
        assert a.declined and a.text == DONT_KNOW and not a.passages


def test_sample_dir_ships_with_the_package():
    assert sorted(p.name for p in sample_dir().iterdir()) == ["contact.txt", "payment.md", "returns.md",
                                                              "shipping.md", "warranty.md"]


def test_kb_command(tmp_path, capsys, monkeypatch):
    from mmchat.cli import main
    monkeypatch.setenv("MMCHAT_HOME", str(tmp_path))
    assert main(["kb", "add", "sample"]) == 0
    assert "returns.md" in capsys.readouterr().out
    assert (tmp_path / "kb.db").exists()
    assert main(["kb", "search", "do", "you", "ship", "to", "Norway"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1]") and "International shipping" in out.splitlines()[0]
    assert main(["kb", "list"]) == 0 and "Warranty" in capsys.readouterr().out
    assert main(["kb", "add", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["kb", "search"]) == 2


def test_extractive_answer_is_a_cited_sentence_of_its_passage(smollm2, kb):
    from mmchat.chat.knowledge import sentences
    a = answer(smollm2, kb, "How much is express shipping?", seed=0, extractive=True)
    body, cite = a.text.rsplit(" [", 1)
    n = int(cite.rstrip("]"))
    assert a.cited == [n] and body in sentences(a.passages[n - 1].text)
