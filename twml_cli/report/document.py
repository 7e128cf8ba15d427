"""A small document model (headings, paragraphs, bullets, tables, figures) and its two
renderers: Markdown, and PDF through fpdf2 with the DejaVu fonts matplotlib ships (so σ
renders and no LaTeX or system package is needed). Knows nothing of twml's studies."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

# ---------------------------------------------------------------- document model


@dataclass
class Heading:
    text: str
    level: int = 1


@dataclass
class Para:
    text: str  # may hold **bold** and `code`


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]

    def drop_constant(self, columns: list[str], dashes: tuple[str, ...] | list[str] = ()) -> tuple[Table, list[str]]:
        """The table without those of `columns` whose value is one and the same in every row,
        and those values as 'column value' phrases for a sentence; a column of `dashes` that
        holds only dashes (nothing measured) is dropped without a phrase."""
        keep, common = [], []
        for i, head in enumerate(self.header):
            values = {r[i] for r in self.rows}
            if head in dashes and values <= {"–"}:
                continue
            if head in columns and len(values) == 1 and self.rows:
                common.append(f"{head} {values.pop()}")
                continue
            keep.append(i)
        return Table([self.header[i] for i in keep], [[r[i] for i in keep] for r in self.rows]), common


@dataclass
class Figure:
    path: Path
    caption: str
    width: float = 0.8  # fraction of the text width in the PDF


@dataclass
class FigureRow:
    """Small figures side by side (one after the other in Markdown)."""

    figures: list[Figure]


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


def to_markdown(doc: Document, relative_to: Path) -> str:
    out = [f"# {doc.title}", ""]
    figure_no = 0
    for b in doc.blocks:
        if isinstance(b, Heading):
            out += ["#" * (b.level + 1) + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Bullets):
            out += [f"- {item}" for item in b.items] + [""]
        elif isinstance(b, Table):
            out += ["| " + " | ".join(b.header) + " |", "|" + "---|" * len(b.header)]
            out += ["| " + " | ".join(r) + " |" for r in b.rows] + [""]
        elif isinstance(b, (Figure, FigureRow)):
            for f in b.figures if isinstance(b, FigureRow) else [b]:
                figure_no += 1
                out += [
                    f"![{f.caption}]({f.path.relative_to(relative_to).as_posix()})",
                    "",
                    f"*Figure {figure_no}: {f.caption}*",
                    "",
                ]
    return "\n".join(out)


def to_pdf(doc: Document, path: Path) -> None:
    import matplotlib
    from fpdf import FPDF
    from fpdf.enums import XPos, YPos

    fonts = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(True, margin=15)
    pdf.add_font("Sans", "", str(fonts / "DejaVuSans.ttf"))
    pdf.add_font("Sans", "B", str(fonts / "DejaVuSans-Bold.ttf"))
    pdf.add_font("Sans", "I", str(fonts / "DejaVuSans-Oblique.ttf"))
    pdf.add_font("Mono", "", str(fonts / "DejaVuSansMono.ttf"))
    pdf.add_page()
    pdf.set_font("Sans", "B", 18)
    pdf.multi_cell(0, 9, doc.title, new_x=XPos.LMARGIN, new_y=YPos.NEXT)
    pdf.ln(2)

    def inline(text: str, size: float = 10) -> None:
        """Text with **bold** and `code` spans from the current position, wrapped at the margins."""
        for part in re.split(r"(\*\*.+?\*\*|`.+?`)", text):
            if part.startswith("**") and part.endswith("**") and len(part) > 4:
                pdf.set_font("Sans", "B", size)
                pdf.write(5.2, part[2:-2])
            elif part.startswith("`") and part.endswith("`") and len(part) > 2:
                pdf.set_font("Mono", "", size - 0.5)
                pdf.write(5.2, part[1:-1])
            elif part:
                pdf.set_font("Sans", "", size)
                pdf.write(5.2, part)
        pdf.ln(6.5)

    figure_no = 0
    for b in doc.blocks:
        if isinstance(b, Heading):
            if pdf.get_y() > pdf.h - pdf.b_margin - (60 if b.level == 1 else 35):  # keep it with what follows
                pdf.add_page()
            pdf.ln(2)
            pdf.set_font("Sans", "B", {1: 14, 2: 11.5}.get(b.level, 10.5))
            pdf.multi_cell(0, 7, b.text, align="L", new_x=XPos.LMARGIN, new_y=YPos.NEXT)
            pdf.ln(1)
        elif isinstance(b, Para):
            inline(b.text)
        elif isinstance(b, Bullets):
            left = pdf.l_margin
            for item in b.items:  # a hanging indent: wrapped lines align after the bullet
                pdf.set_font("Sans", "", 10)
                pdf.set_x(left + 1)
                pdf.write(5.2, "\u2022")
                pdf.set_left_margin(left + 5)
                pdf.set_x(left + 5)
                inline(item)
                pdf.set_left_margin(left)
        elif isinstance(b, Table):
            header = [h.replace("`", "") for h in b.header]
            rows = [[c.replace("`", "").replace("**", "") for c in r] for r in b.rows]
            for cols, size, widths in _table_parts(pdf, header, rows):
                pdf.set_font("Sans", "", size)
                with pdf.table(
                    col_widths=widths,
                    width=min(sum(widths), pdf.epw),
                    text_align="CENTER",
                    line_height=size * 0.58,
                    first_row_as_headings=True,
                ) as table:
                    head = table.row()
                    for j in cols:
                        head.cell(header[j])
                    for r in rows:
                        row = table.row()
                        for j in cols:
                            row.cell(r[j])
                pdf.ln(3)
        elif isinstance(b, (Figure, FigureRow)):
            group = b.figures if isinstance(b, FigureRow) else [b]
            widths = [pdf.epw * f.width for f in group]
            heights = [w * _aspect(f.path) for w, f in zip(widths, group)]
            if pdf.get_y() + max(heights) + 12 > pdf.h - pdf.b_margin:
                pdf.add_page()
            gap = 8
            x = pdf.l_margin + (pdf.epw - sum(widths) - gap * (len(group) - 1)) / 2
            top = pdf.get_y()
            for f, w, h in zip(group, widths, heights):
                figure_no += 1
                pdf.image(str(f.path), x=x, y=top, w=w)
                pdf.set_xy(x - gap / 2, top + h + 1)
                pdf.set_font("Sans", "I", 8.5)
                pdf.multi_cell(w + gap, 4.5, f"Figure {figure_no}: {f.caption}", align="C")
                x += w + gap
            pdf.set_xy(pdf.l_margin, top + max(heights) + 1 + 4.5 * 2 + 2)
    pdf.output(str(path))


def _table_parts(pdf, header: list[str], rows: list[list[str]]) -> list[tuple[list[int], float, list[float]]]:
    """How to set a table so that no word breaks: (columns, font size, column widths in mm)
    for each part. A column is at least as wide as its longest word (cells and headers wrap
    between words only) and at most as wide as its widest cell on one line; the room left on
    the page goes to the columns that would wrap, in proportion to what they lack. The largest
    font from 8 down to 6 pt that fits the page wins; a table too wide even at 6 pt is split
    into parts that fit, each repeating the first column (what names the rows)."""
    pad = 2 * pdf.c_margin + 1.0  # the cell's margins on both sides, and a little air

    def measure(size: float) -> tuple[list[float], list[float]]:
        least, most = [], []
        for j, head in enumerate(header):
            pdf.set_font("Sans", "B", size)
            head_words = [pdf.get_string_width(w) for w in head.split() or [""]]
            pdf.set_font("Sans", "", size)
            cells = [r[j] for r in rows]
            words = [pdf.get_string_width(w) for c in cells for w in c.split()] or [0.0]
            least.append(max(head_words + words) + pad)
            most.append(max([max(head_words)] + [pdf.get_string_width(c) for c in cells]) + pad)
        return least, most

    def fit(least: list[float], most: list[float], room: float) -> list[float]:
        if sum(most) <= room:
            return most
        lack = [m - lo for lo, m in zip(least, most)]
        share = (room - sum(least)) / sum(lack) if sum(lack) > 0 else 0.0
        return [lo + share * d for lo, d in zip(least, lack)]

    for size in (8.0, 7.5, 7.0, 6.5, 6.0):
        least, most = measure(size)
        if sum(least) <= pdf.epw:
            return [(list(range(len(header))), size, fit(least, most, pdf.epw))]
    parts, current = [], [0]
    for j in range(1, len(header)):
        if sum(least[k] for k in current) + least[j] > pdf.epw and len(current) > 1:
            parts.append(current)
            current = [0]
        current.append(j)
    parts.append(current)
    return [(cols, size, fit([least[k] for k in cols], [most[k] for k in cols], pdf.epw)) for cols in parts]


def _aspect(path: Path) -> float:
    from PIL import Image

    with Image.open(path) as img:
        return img.height / img.width
