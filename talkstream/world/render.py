"""Anti-aliased avatar renderer (skia): identity + per-frame state -> an RGB frame.

Geometry is laid out on a 256-unit canvas and scaled to any output size. The head is treated as an
ellipsoid: facial features sit at surface angles and are projected with the head's yaw and pitch
(they slide and foreshorten when the head turns), roll rotates the head about the neck, and a
radial shading follows the face so a turn is unmistakable. Pure function of its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import astuple, dataclass, fields

import numpy as np
import skia

from .identity import Identity

UNITS = 256.0


@dataclass(frozen=True)
class FrameState:
    """Everything that changes from frame to frame (the world's per-frame ground truth)."""

    jaw_open: float = 0.0  # 0..1
    lip_width: float = 0.5  # 0..1
    lip_round: float = 0.1  # 0..1
    teeth: float = 0.0  # 0..1
    tongue: float = 0.0  # 0..1
    yaw: float = 0.0  # degrees, + turns to the viewer's right
    pitch: float = 0.0  # degrees, + looks down
    roll: float = 0.0  # degrees, + tilts clockwise
    tx: float = 0.0  # head translation, fraction of the canvas
    ty: float = 0.0
    blink: float = 0.0  # 0 open .. 1 closed
    gaze_x: float = 0.0  # -1..1
    gaze_y: float = 0.0
    brow: float = 0.0  # -1 frown .. 1 raised
    smile: float = 0.0  # 0..1

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(f.name for f in fields(FrameState))

    def to_array(self) -> np.ndarray:
        return np.asarray(astuple(self), np.float32)

    @staticmethod
    def from_array(a: np.ndarray) -> FrameState:
        return FrameState(*(float(x) for x in a))


STATE_FIELDS = FrameState.names()


def _c(rgb, scale: float = 1.0, alpha: int = 255) -> int:
    r, g, b = (int(max(0, min(255, round(v * scale)))) for v in rgb)
    return skia.Color(r, g, b, alpha)


def _paint(color: int, stroke: float = 0.0, shader=None) -> skia.Paint:
    p = skia.Paint(AntiAlias=True, Color=color if shader is None else skia.ColorBLACK)
    if stroke:
        p.setStyle(skia.Paint.kStroke_Style)
        p.setStrokeWidth(stroke)
        p.setStrokeCap(skia.Paint.kRound_Cap)
        p.setStrokeJoin(skia.Paint.kRound_Join)
    if shader is not None:
        p.setShader(shader)
    return p


def head_center(s: FrameState) -> tuple[float, float]:
    """The head ellipse's centre on the 256-unit canvas."""
    return 128 + s.tx * UNITS, 108 + s.ty * UNITS


def mouth_center(identity: Identity, s: FrameState) -> tuple[float, float]:
    """Where the mouth's centre lands on the 256-unit canvas (the renderer's projection, roll included):
    the world's exact mouth location, e.g. for a lip-region loss weight."""
    W, H = identity.face_width * UNITS, identity.face_height * UNITS
    cx, cy = head_center(s)
    x = cx + W * math.sin(math.radians(s.yaw))
    y = cy + H * math.sin(0.36 + math.radians(s.pitch))
    r = math.radians(s.roll)  # rotation about the neck (cx, cy + H), as canvas.rotate does
    dx, dy = x - cx, y - (cy + H)
    return cx + dx * math.cos(r) - dy * math.sin(r), cy + H + dx * math.sin(r) + dy * math.cos(r)


def _oval(cx: float, cy: float, rx: float, ry: float) -> skia.Rect:
    return skia.Rect.MakeLTRB(cx - rx, cy - ry, cx + rx, cy + ry)


class Renderer:
    """Renders frames of one identity; caches what does not change (background, paints)."""

    def __init__(self, identity: Identity, size: int | tuple[int, int] = 256) -> None:
        self.identity = identity
        self.width, self.height = (size, size) if isinstance(size, int) else size
        if self.width < 8 or self.height < 8:
            raise ValueError(f"render size must be at least 8x8, got {self.width}x{self.height}")
        self._background = self._render_background()

    # -- static parts ------------------------------------------------------------------------------
    def _render_background(self) -> skia.Image:
        idn = self.identity
        surface = skia.Surface(self.width, self.height)
        c0, c1 = idn.background_colours
        with surface as canvas:
            canvas.scale(self.width / UNITS, self.height / UNITS)
            if idn.background == "solid":
                canvas.drawColor(_c(c0))
            elif idn.background == "gradient":
                shader = skia.GradientShader.MakeLinear([(0, 0), (0, UNITS)], [_c(c0), _c(c1)])
                canvas.drawRect(skia.Rect(0, 0, UNITS, UNITS), _paint(0, shader=shader))
            elif idn.background == "wall":
                canvas.drawColor(_c(c0))
                canvas.drawRect(skia.Rect(0, 170, UNITS, UNITS), _paint(_c(c1)))
                canvas.drawLine(0, 170, UNITS, 170, _paint(_c(c1, 0.7), 3))
            elif idn.background == "vignette":
                shader = skia.GradientShader.MakeRadial((128, 110), 200, [_c(c0), _c(c1, 0.6)])
                canvas.drawRect(skia.Rect(0, 0, UNITS, UNITS), _paint(0, shader=shader))
            else:  # stripes
                canvas.drawColor(_c(c0))
                for x in range(0, 256, 32):
                    canvas.drawRect(skia.Rect(x, 0, x + 16, UNITS), _paint(_c(c1)))
        return surface.makeImageSnapshot()

    def background(self) -> np.ndarray:
        """The empty scene (no person): RGB uint8 [H, W, 3]; what ``metrics.silhouette_iou`` separates a person from."""
        pixels = np.empty((self.height, self.width, 4), np.uint8)
        with skia.Surface(pixels) as canvas:
            canvas.drawImage(self._background, 0, 0)
        return pixels[..., :3].copy()

    # -- one frame ---------------------------------------------------------------------------------
    def render(self, state: FrameState | None = None) -> np.ndarray:
        """An RGB uint8 frame [H, W, 3]."""
        state = state or FrameState()
        pixels = np.empty((self.height, self.width, 4), np.uint8)
        surface = skia.Surface(pixels)
        with surface as canvas:
            canvas.drawImage(self._background, 0, 0)
            canvas.scale(self.width / UNITS, self.height / UNITS)
            self._draw(canvas, state)
        return pixels[..., :3].copy()

    def _draw(self, canvas: skia.Canvas, s: FrameState) -> None:
        idn = self.identity
        W, H = idn.face_width * UNITS, idn.face_height * UNITS
        cx, cy = head_center(s)
        yaw, pitch = math.radians(s.yaw), math.radians(s.pitch)
        skin = idn.skin

        # body: shoulders follow the head's translation at a third
        bx = 128 + s.tx * UNITS * 0.35
        self._draw_body(canvas, bx, cx, cy + H * 0.75, W)

        canvas.save()
        canvas.rotate(s.roll, cx, cy + H)  # roll about the neck
        self._draw_hair(canvas, s, cx, cy, W, H, yaw, back=True)
        # ears: at the sides of the head; the head occludes them as it turns
        for side in (-1, 1):
            a = side * math.pi / 2 + yaw
            if math.cos(a) > -0.35:
                ex = cx + W * math.sin(a) * 1.0
                canvas.drawOval(_oval(ex, cy + H * 0.02 + H * math.sin(pitch) * 0.1, 7, 12), _paint(_c(skin, 0.85)))

        # head silhouette, its jaw narrowing and dropping as the mouth opens
        drop = s.jaw_open * 6.0
        path = skia.Path()
        n = 48
        for i in range(n + 1):
            a = 2 * math.pi * i / n
            sa, ca = math.sin(a), math.cos(a)
            x = W * ca
            y = H * sa
            if sa > 0:  # lower half: jaw
                x *= idn.jaw_width + (1 - idn.jaw_width) * (1 - sa) ** 0.7
                y += drop * sa**4
            (path.moveTo if i == 0 else path.lineTo)(cx + x, cy + y)
        path.close()
        lx = cx + W * math.sin(yaw) * 0.55 - W * 0.25
        ly = cy - H * 0.35 + H * math.sin(pitch) * 0.4
        shade = skia.GradientShader.MakeRadial(
            (lx, ly), max(W, H) * 1.45, [_c(skin, 1.1), _c(skin, 0.98), _c(skin, 0.68)], [0.0, 0.45, 1.0]
        )
        canvas.drawPath(path, _paint(0, shader=shade))

        def project(u: float, v: float, depth: float = 1.0) -> tuple[float, float, float, float]:
            """Surface angles -> canvas point and foreshortening (fx, fy)."""
            return (
                cx + W * math.sin(u + yaw) * depth,
                cy + H * math.sin(v + pitch) * depth,
                max(math.cos(u + yaw), 0.0),
                max(math.cos(v + pitch), 0.0),
            )

        self._draw_eyes(canvas, s, project)
        self._draw_nose(canvas, s, project, W, H)
        self._draw_mouth(canvas, s, project)
        self._draw_hair(canvas, s, cx, cy, W, H, yaw, back=False)
        canvas.restore()

    def _draw_body(self, canvas, bx: float, cx: float, neck_top: float, W: float) -> None:
        idn = self.identity
        neck = skia.Path()
        neck.addRect(skia.Rect.MakeLTRB(cx - W * 0.42, neck_top - 10, cx + W * 0.42, 222))
        canvas.drawPath(neck, _paint(_c(idn.skin, 0.78)))
        col = idn.clothing_colour
        if idn.clothing == "hoodie":
            canvas.drawOval(_oval(bx, 214, 62, 20), _paint(_c(col, 0.75)))
        torso = skia.Path()
        torso.moveTo(bx - 120, 260)
        torso.lineTo(bx - 110, 226)
        torso.quadTo(bx - 95, 204, bx - 45, 204)
        torso.lineTo(bx + 45, 204)
        torso.quadTo(bx + 95, 204, bx + 110, 226)
        torso.lineTo(bx + 120, 260)
        torso.close()
        shader = skia.GradientShader.MakeLinear([(bx, 200), (bx, 256)], [_c(col, 1.05), _c(col, 0.8)])
        canvas.drawPath(torso, _paint(0, shader=shader))
        if idn.clothing == "tshirt":
            canvas.drawArc(_oval(bx, 204, 26, 14), 0, 180, False, _paint(_c(idn.skin, 0.78)))
        elif idn.clothing == "collar":
            for side in (-1, 1):
                p = skia.Path()
                p.moveTo(bx, 222)
                p.lineTo(bx + side * 26, 202)
                p.lineTo(bx + side * 30, 216)
                p.close()
                canvas.drawPath(p, _paint(_c((245, 245, 245))))
        elif idn.clothing == "hoodie":
            for side in (-1, 1):
                canvas.drawLine(bx + side * 10, 210, bx + side * 12, 240, _paint(_c((235, 235, 235)), 2))
        else:  # suit: shirt V, tie, lapels
            v = skia.Path()
            v.moveTo(bx - 22, 204)
            v.lineTo(bx, 250)
            v.lineTo(bx + 22, 204)
            v.close()
            canvas.drawPath(v, _paint(_c((240, 240, 240))))
            tie = skia.Path()
            tie.moveTo(bx - 4, 206)
            tie.lineTo(bx + 4, 206)
            tie.lineTo(bx + 6, 240)
            tie.lineTo(bx, 248)
            tie.lineTo(bx - 6, 240)
            tie.close()
            canvas.drawPath(tie, _paint(_c((170, 30, 40))))
            for side in (-1, 1):
                canvas.drawLine(bx + side * 22, 204, bx + side * 8, 250, _paint(_c(col, 0.6), 3))

    def _draw_hair(self, canvas, s: FrameState, cx, cy, W, H, yaw, back: bool) -> None:
        idn, style = self.identity, self.identity.hair_style
        col = idn.hair_colour
        paint = _paint(_c(col))
        shift = W * math.sin(yaw) * 0.5  # the crown moves with the face
        if back:
            if style == "long":
                r = skia.RRect.MakeRectXY(
                    skia.Rect.MakeLTRB(cx - W * 1.22, cy - H * 1.02, cx + W * 1.22, cy + H * 1.25), W * 0.6, W * 0.6
                )
                canvas.drawRRect(r, _paint(_c(col, 0.85)))
            elif style == "bob":
                canvas.drawOval(_oval(cx, cy - H * 0.05, W * 1.22, H * 1.0), _paint(_c(col, 0.9)))
            elif style == "bun":
                canvas.drawCircle(cx + shift * 0.5, cy - H * 1.08, W * 0.42, _paint(_c(col, 0.95)))
            return
        if style == "bald":
            canvas.drawOval(
                _oval(cx - W * 0.2 + shift * 0.6, cy - H * 0.8, W * 0.25, H * 0.08), _paint(_c(idn.skin, 1.15, 120))
            )
            return
        if style == "mohawk":
            p = skia.Path()
            p.addOval(_oval(cx + shift, cy - H * 0.9, W * 0.16, H * 0.3))
            canvas.drawPath(p, paint)
            return
        # a cap of hair over the cranium, bounded below by a fringe curve
        canvas.save()
        clip = skia.Path()
        clip.addOval(_oval(cx, cy - 1.5, W * 1.07, H * 1.05))
        canvas.clipPath(clip, doAntiAlias=True)
        fringe = skia.Path()
        top = cy - H * 1.2
        fy = cy - H * (0.52 if style != "side_part" else 0.45)
        fringe.moveTo(cx - W * 1.3, top)
        fringe.lineTo(cx + W * 1.3, top)
        fringe.lineTo(cx + W * 1.3, cy - H * 0.05 if style in ("bob", "long") else fy + H * 0.05)
        if style == "side_part":
            fringe.quadTo(cx + shift + W * 0.3, fy - H * 0.25, cx + shift - W * 0.35, fy + H * 0.05)
        else:
            fringe.quadTo(
                cx + shift, fy - H * 0.22, cx - W * 1.3, cy - H * 0.05 if style in ("bob", "long") else fy + H * 0.05
            )
        fringe.lineTo(cx - W * 1.3, fy)
        fringe.close()
        shader = skia.GradientShader.MakeRadial(
            (cx - W * 0.3 + shift, cy - H * 0.9), W * 1.6, [_c(col, 1.25), _c(col, 0.85)]
        )
        canvas.drawPath(fringe, _paint(0, shader=shader))
        canvas.restore()
        if style == "curly":
            for i in range(11):
                a = math.pi + math.pi * i / 10
                canvas.drawCircle(
                    cx + W * 1.02 * math.cos(a) + shift * 0.3, cy - 2 + H * 0.98 * math.sin(a), W * 0.17, paint
                )

    def _draw_eyes(self, canvas, s: FrameState, project) -> None:
        idn = self.identity
        for side in (-1, 1):
            x, y, fx, fy = project(side * 0.4 * idn.eye_spacing, -0.13 + idn.eye_height)
            if fx <= 0.05:
                continue
            rx, ry = 8.5 * idn.eye_size * fx, 5.2 * idn.eye_size * fy
            rect = _oval(x, y, rx, ry)
            # socket shadow
            canvas.drawOval(_oval(x, y - 1, rx * 1.25, ry * 1.45), _paint(_c(idn.skin, 0.82)))
            canvas.save()
            eye = skia.Path()
            eye.addOval(rect)
            canvas.clipPath(eye, doAntiAlias=True)
            canvas.drawOval(rect, _paint(_c((245, 243, 238))))
            ix, iy = x + s.gaze_x * rx * 0.45, y + s.gaze_y * ry * 0.4
            canvas.drawCircle(ix, iy, ry * 0.95, _paint(_c(idn.eye_colour)))
            canvas.drawCircle(ix, iy, ry * 0.45, _paint(_c((10, 10, 10))))
            canvas.drawCircle(ix - ry * 0.3, iy - ry * 0.35, ry * 0.18, _paint(_c((255, 255, 255))))
            # upper eyelid closes down over the eye
            lid = min(max(s.blink, 0.0), 1.0)
            if lid > 0.01:
                canvas.drawRect(
                    skia.Rect.MakeLTRB(x - rx, y - ry, x + rx, y - ry + 2 * ry * lid), _paint(_c(idn.skin, 0.95))
                )
            canvas.restore()
            lid_y = y - ry + 2 * ry * min(max(s.blink, 0.0), 1.0)
            arc = skia.Path()
            arc.moveTo(x - rx, y)
            arc.quadTo(x, lid_y - (ry if s.blink < 0.5 else -ry * 0.3) * (1 - s.blink), x + rx, y)
            canvas.drawPath(arc, _paint(_c((30, 20, 15)), 1.6))
            # brow
            by = y - ry - 6 - 4 * s.brow
            tilt = idn.brow_tilt * 5 * side
            canvas.drawLine(
                x - rx * 1.1 * side * -1 - side * rx * 2.2,
                by + tilt,
                x + side * rx * 1.15,
                by - tilt - 1.5,
                _paint(_c(idn.hair_colour, 0.8), 2.6 * idn.brow_thickness * fy),
            )
            if idn.glasses != "none":
                gp = _paint(_c(idn.glasses_colour), 1.8)
                if idn.glasses == "round":
                    canvas.drawOval(_oval(x, y + 1, rx * 1.45, 11 * fy), gp)
                else:
                    canvas.drawRect(skia.Rect.MakeLTRB(x - rx * 1.45, y - 9 * fy, x + rx * 1.45, y + 11 * fy), gp)
        if idn.glasses != "none":
            (x0, y0, _, _), (x1, y1, _, _) = (
                project(-0.4 * idn.eye_spacing + 0.2, -0.13 + idn.eye_height),
                project(0.4 * idn.eye_spacing - 0.2, -0.13 + idn.eye_height),
            )
            canvas.drawLine(x0, y0, x1, y1, _paint(_c(idn.glasses_colour), 1.8))

    def _draw_nose(self, canvas, s: FrameState, project, W, H) -> None:
        idn = self.identity
        top_x, top_y, _, _ = project(0.0, -0.05)
        tip_x, tip_y, fx, _ = project(0.0, 0.12 * idn.nose_length, depth=1.12)
        w = 6.5 * idn.nose_width * (0.4 + 0.6 * fx)
        side = 1 if s.yaw >= 0 else -1
        shadow = skia.Path()
        shadow.moveTo(top_x, top_y)
        shadow.quadTo(tip_x - side * w * 0.8, (top_y + tip_y) / 2, tip_x - side * w * 0.2, tip_y + 2)
        shadow.lineTo(tip_x + side * w, tip_y + 1)
        shadow.close()
        canvas.drawPath(shadow, _paint(_c(idn.skin, 0.8, 170)))
        canvas.drawOval(_oval(tip_x, tip_y, w, 3.5), _paint(_c(idn.skin, 0.88)))
        for k in (-1, 1):
            canvas.drawOval(
                _oval(tip_x + k * w * 0.5, tip_y + 1.2, 1.6 * (0.4 + 0.6 * fx), 1.0), _paint(_c(idn.skin, 0.45))
            )

    def _draw_mouth(self, canvas, s: FrameState, project) -> None:
        idn = self.identity
        x, y, fx, fy = project(0.0, 0.36)
        half = 15.0 * idn.mouth_width * (0.8 + 0.45 * s.lip_width) * (1 - 0.38 * s.lip_round) * (0.3 + 0.7 * fx)
        open_h = (1.0 + 18.0 * max(s.jaw_open, 0.0)) * fy
        corner = -s.smile * 4.0  # smiling lifts the corners
        upper = y - open_h * 0.3
        lower = y + open_h * 0.7
        lip_col = idn.lip_colour
        mouth = skia.Path()
        mouth.moveTo(x - half, y + corner)
        mouth.cubicTo(x - half * 0.5, upper - 1.5, x + half * 0.5, upper - 1.5, x + half, y + corner)
        mouth.cubicTo(x + half * 0.5, lower + 1.5, x - half * 0.5, lower + 1.5, x - half, y + corner)
        mouth.close()
        if open_h > 2.0:
            canvas.drawPath(mouth, _paint(_c((70, 18, 25))))
            canvas.save()
            canvas.clipPath(mouth, doAntiAlias=True)
            if s.teeth > 0.05:
                th = min(open_h * 0.35, 4.5) * min(s.teeth * 1.5, 1.0)
                canvas.drawRect(
                    skia.Rect.MakeLTRB(x - half, upper - 3, x + half, upper + th), _paint(_c((240, 238, 230)))
                )
            if s.tongue > 0.1:
                canvas.drawOval(
                    _oval(x, lower - 1, half * 0.6, open_h * 0.35 * s.tongue + 1), _paint(_c((200, 90, 100)))
                )
            canvas.restore()
            canvas.drawPath(mouth, _paint(_c(lip_col), 2.6))
        else:
            canvas.drawPath(mouth, _paint(_c(lip_col, 0.9)))
            line = skia.Path()
            line.moveTo(x - half, y + corner)
            line.quadTo(x, y + 0.6 - s.smile * 1.5, x + half, y + corner)
            canvas.drawPath(line, _paint(_c(lip_col, 0.55), 1.3))


def render_frame(identity: Identity, state: FrameState | None = None, size: int = 256) -> np.ndarray:
    return Renderer(identity, size).render(state)


def render_states(identity: Identity, states: np.ndarray, size: int | tuple[int, int] = 256) -> Iterator[np.ndarray]:
    """Frames for rows of FrameState values ([T, len(STATE_FIELDS)]), lazily."""
    renderer = Renderer(identity, size)
    for row in states:
        yield renderer.render(FrameState.from_array(row))
